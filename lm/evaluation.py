"""Evaluation and the model card of `sae train-lm` (lm/train.py): validation
cross-entropy next to the unigram entropy of the same tokens, greedy samples, and the README
written next to the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int

from activations.model import heal_prompt
from lm.data import ValidationWindows
from lm.optim import OPTIMIZERS

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast


@torch.no_grad()
def validation_loss(model: GPT2LMHeadModel, windows: ValidationWindows, batch_size: int) -> float:
    """Mean next-token cross-entropy in nats over the targets the windows score."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows.contexts), batch_size):
        x_BS = windows.contexts[i : i + batch_size].to(device)
        logits = model(input_ids=x_BS).logits[:, :-1].float()
        ce_BT = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), x_BS[:, 1:], reduction="none"
        )
        position_T = torch.arange(ce_BT.shape[1], device=device)
        scored_BT = position_T >= windows.first_scored[i : i + batch_size, None].to(device)
        total += float(ce_BT[scored_BT].double().sum())
        count += int(scored_BT.sum())
    return total / count


def unigram_entropy(targets: Int[torch.Tensor, " T"], vocab_size: int) -> float:
    """Entropy (nats) of the empirical distribution of the validation targets: the loss of
    the best context-free predictor, fitted on the test data itself."""
    counts = torch.bincount(targets.reshape(-1), minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def greedy_sample(
    model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerFast, prompt: str, n: int = 32
) -> str:
    """The prompt continued by n greedy tokens (BOS-prefixed, as in training), with token
    healing (`activations.model.heal_prompt`) so that "def " continues with a name."""
    model.eval()
    device = next(model.parameters()).device
    ids, allowed = heal_prompt(tokenizer, prompt)
    for _ in range(n):
        window = torch.tensor([ids[-model.config.n_positions :]], device=device)
        logits = model(input_ids=window).logits[0, -1]
        if allowed is not None:
            logits = logits.masked_fill(~allowed[: len(logits)].to(device), float("-inf"))
            allowed = None
        ids.append(int(logits.argmax()))
    return str(tokenizer.decode(ids[1:], clean_up_tokenization_spaces=False))


def portable_tokenizer_config(model_dir: Path) -> None:
    """Name the tokenizer class `PreTrainedTokenizerFast`, which transformers 4.x and 5.x both
    load; transformers 5 writes its new internal name `TokenizersBackend`, unknown to 4.x."""
    from sae.atomic import atomic_write_json

    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # Where this copy was loaded from (transformers 5.24 writes it), not part of the tokenizer.
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    atomic_write_json(path, config)


def model_card(metrics: dict[str, Any]) -> str:
    """The README.md written next to the weights."""
    c = metrics["config"]
    samples = "\n\n".join(
        f"Prompt `{p!r}` →\n\n```python\n{s}\n```" for p, s in metrics["samples"].items()
    )
    return f"""# {metrics["name"]}: a one-layer GPT-2 trained on the Python standard library

The default model of this project: the shape studied in Anthropic's "Towards
Monosemanticity" (one layer, residual width {c["d_model"]}, {c["d_mlp"]} MLP neurons) in
miniature, trained from scratch by `sae train-lm` on the `.py` files of the Python
{metrics["corpus"]["python"]} standard library (see `activations/corpus.py` for what is in and
out). A standard Hugging Face GPT-2 directory, so it loads through the same TransformerLens path
as hub models: `activations.model.load_model("{metrics["name"]}")`.

| | |
|---|---|
| layers / d_model / d_mlp / heads | {c["n_layers"]} / {c["d_model"]} / {c["d_mlp"]} / {c["n_heads"]} |
| context | {c["n_ctx"]} tokens, first token `<|endoftext|>` (BOS) |
| tokenizer | byte-level BPE, {metrics["vocab_size"]} tokens, trained on the train split |
| parameters | {metrics["parameters"]:,} |
| unembedding | {"tied to" if c["tie_embeddings"] else "separate from"} the token embedding |
| optimisation | {OPTIMIZERS[c.get("optimizer", "adamw")].description}, peak lr {c["lr"]}, {c["warmup_steps"]} warm-up steps, cosine to {c["min_lr_ratio"]} of peak; {c["autocast"]} autocast{", torch.compile" if c["compile"] else ""} |
| tokens seen | {metrics["tokens_seen"]:,} ({metrics["steps"]} steps × {c["batch_size"]} × {c["n_ctx"]}) |
| train corpus | {metrics["corpus"]["train_documents"]} files, {metrics["corpus"]["train_tokens"]:,} tokens |
| **validation cross-entropy** (sliding windows, stride {metrics["eval_stride"]}: at least {metrics["val_min_context"]} tokens of context after the first window) | **{metrics["val_ce_nats_per_token"]:.4f} nats/token** |
| validation cross-entropy, disjoint windows of {c["n_ctx"]} (the first target of each sees only BOS) | {metrics["val_ce_disjoint_windows_nats_per_token"]:.4f} nats/token |
| unigram entropy of the same {metrics["val_tokens"]:,} validation tokens | {metrics["unigram_entropy_nats_per_token"]:.4f} nats/token |
| ratio (sliding; disjoint) | {metrics["val_ce_nats_per_token"] / metrics["unigram_entropy_nats_per_token"]:.3f}; {metrics["val_ce_disjoint_windows_nats_per_token"] / metrics["unigram_entropy_nats_per_token"]:.3f} |
| training time | {metrics["train_seconds"] / 60:.1f} min of optimisation, {metrics["total_seconds"] / 60:.1f} min in all, {c["threads"]} CPU threads |
| machine | {metrics["machine"]} |

The validation split is about 5% of the files, chosen by a hash of the relative path.
Both cross-entropies score every validation token exactly once. The sliding windows
(`validation_windows` in `lm/data.py`) predict each token from the tokens before
it, as a reader of the file would; disjoint windows restart the context every {c["n_ctx"] - 1}
tokens, and their first few predictions from almost nothing weigh on the mean.
The unigram entropy is that of the empirical token distribution of the validation targets
themselves: the loss of the best context-free predictor, fitted on the test data.

## Reproduce

```
{metrics["command"]}
```

Full configuration and all numbers: `training_metrics.json` (written by the run).

## Greedy samples

{samples}
"""
