"""Feature analysis (issue 6): ONE pass of text through model + dictionary collects, for every
feature at once, its top-N activating contexts, a uniform sample of its activations bucketed
by quantile, firing counts, mean and max activation and an activation histogram; then the
logit effects of every decoder direction. The result goes to the feature store (sae/store.py).

This module is the driver and the activation sources (a model pass or an activation cache);
the per-feature bookkeeping is activations/feature_accumulator.py and the logit effects are
activations/logit_effects.py, both re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm import tqdm

from activations.feature_accumulator import (
    AnalysisConfig,
    ExampleSlots,
    FeatureAccumulator,
    activation_keys,
    key_values,
    sample_keys,
)
from activations.logit_effects import LogitEffects, logit_effects, residual_directions
from sae.base import Dictionary
from sae.errors import UserError
from sae.store import FeatureArrays, StoreMeta

__all__ = [
    "ActivationBatch",
    "AnalysisConfig",
    "ExampleSlots",
    "FeatureAccumulator",
    "LogitEffects",
    "activation_keys",
    "analyze",
    "cached_activations",
    "check_pairing",
    "key_values",
    "logit_effects",
    "model_activations",
    "residual_directions",
    "sample_keys",
    "token_strings",
]


class ActivationBatch(NamedTuple):
    tokens: Int[Tensor, "S T"]
    sequence: Int[Tensor, " S"]
    acts: Float[Tensor, "S T D"]
    valid: Bool[Tensor, "S T"] | None = None
    """False where the source has no activation (a cache that dropped BOS rows)."""


def check_pairing(model: Any, dictionary: Dictionary, hook_name: str) -> None:
    """Fail before any work if the model has no such hook or its width is not d_in."""
    from activations.hooks import hook_widths

    width = hook_widths(model, [hook_name])[hook_name]
    if width != dictionary.d_in:
        raise UserError(
            f"dictionary reads {hook_name} with d_in {dictionary.d_in}, but the model's "
            f"{hook_name} has width {width}: wrong model or dictionary"
        )


def model_activations(
    model: Any, hook_name: str, text: Any, n_tokens: int, device: torch.device | str
) -> Iterator[ActivationBatch]:
    """Run contexts of `text` (a TextConfig) through the model, yielding the hook's
    activations until `n_tokens` tokens (whole contexts) have been produced."""
    from activations.hooks import ActivationCapture
    from activations.prefetch import in_background
    from activations.text import context_batches

    max_contexts = -(-n_tokens // text.context_size)
    batches = context_batches(text, model.tokenizer, max_contexts=max_contexts)
    with ActivationCapture(model, [hook_name]) as capture:
        # Tokenize on a background thread, ahead of the forward pass.
        for batch in in_background(batches, depth=4):
            tokens = batch.tokens.to(device)
            acts = capture(tokens)[hook_name]
            yield ActivationBatch(tokens, batch.sequence, acts)


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def cached_activations(
    path: str | Path,
    hook_name: str,
    n_tokens: int,
    batch_size: int,
    fill_token: int,
    device: torch.device | str,
) -> Iterator[ActivationBatch]:
    """Whole contexts rebuilt from an activation cache (`sae cache`), which stores each
    row's token id, context index and position: no model forward at all.

    Rows of one context are consecutive within a rank's shards (a context may straddle two
    shards); positions the cache left out (BOS) get `fill_token` and are marked invalid.
    """
    from safetensors import safe_open

    from activations.reader import memmap_activations, open_manifest

    folder, manifest = open_manifest(path, hook_name)
    if manifest.get("hook_name") != hook_name:
        raise UserError(f"activation cache {folder} holds {manifest.get('hook_name')!r}, "
                        f"not {hook_name!r}")  # fmt: skip
    T = int(manifest["context_size"])
    emitted = 0
    rest: list[Tensor] = []

    def emit(acts: Tensor, tok: Tensor, seq: Tensor, pos: Tensor) -> ActivationBatch:
        uniq, local = torch.unique_consecutive(seq, return_inverse=True)
        S, p = uniq.numel(), pos.long()
        tokens = torch.full((S, T), fill_token, dtype=torch.long)
        tokens[local, p] = tok.long()
        full = torch.zeros((S, T, acts.shape[-1]), dtype=acts.dtype)
        full[local, p] = acts
        valid = torch.zeros((S, T), dtype=torch.bool)
        valid[local, p] = True
        return ActivationBatch(tokens.to(device), uniq, full.to(device), valid.to(device))

    for shard in manifest["shards"]:
        file = folder / shard["file"]
        with safe_open(str(file), "pt") as st:
            cols = [memmap_activations(file)] + [
                st.get_tensor(k) for k in ("token_ids", "sequence", "position")
            ]
        if rest:
            cols = [torch.cat([r, c]) for r, c in zip(rest, cols, strict=True)]
        seq = cols[2]
        if seq.numel() == 0:
            continue
        _, counts = torch.unique_consecutive(seq, return_counts=True)
        ends = counts.cumsum(0).tolist()
        # The last context may continue in the next shard: keep it for then.
        rest = [c[ends[-2] if len(ends) > 1 else 0 :] for c in cols]
        start = 0
        for i in range(0, len(ends) - 1, batch_size):
            stop = ends[min(i + batch_size, len(ends) - 1) - 1]
            batch = emit(*(c[start:stop] for c in cols))
            emitted += stop - start
            start = stop
            yield batch
            if emitted >= n_tokens:
                return
    if rest and rest[0].numel():
        yield emit(*rest)


def token_strings(tokenizer: Any, d_vocab: int) -> list[str]:
    """How each token id reads in text (byte-level BPE markers decoded)."""
    n = min(d_vocab, len(tokenizer))
    vocab = [tokenizer.decode([i]) for i in range(n)]
    return vocab + [f"<{i}>" for i in range(n, d_vocab)]


@torch.no_grad()
def analyze(
    model: Any,
    dictionary: Dictionary,
    text: Any,
    cfg: AnalysisConfig,
    *,
    hook_name: str | None = None,
    dictionary_name: str = "",
    model_name: str = "",
    progress: bool = True,
    cache: str | Path | None = None,
) -> FeatureArrays:
    """The whole analysis of one dictionary: one pass over `text` (a TextConfig), or over
    the activation cache `cache` if given (no model forward), then logit effects. Checks
    the model/dictionary pairing first."""
    hook_name = hook_name or dictionary.cfg.hook_name
    if not hook_name:
        raise UserError("the dictionary's cfg.json names no hook_name; pass --hook")
    check_pairing(model, dictionary, hook_name)
    device = dictionary.device
    acc = FeatureAccumulator(dictionary.d_sae, cfg, device)
    bar = tqdm(total=cfg.n_tokens, unit="tok", disable=not progress, desc="analyze")
    pad = _pad_id(model.tokenizer)
    source: Iterator[ActivationBatch]
    if cache is not None:
        from activations.prefetch import in_background

        source = in_background(
            cached_activations(cache, hook_name, cfg.n_tokens, text.batch_size, pad, device), 2
        )
    else:
        source = model_activations(model, hook_name, text, cfg.n_tokens, device)
    for batch in source:
        x = batch.acts.to(dictionary.dtype)
        acc.update(batch.tokens, batch.sequence, dictionary.encode(x), batch.valid)
        bar.update(batch.tokens.numel())
    bar.close()
    if acc.n_tokens == 0:
        raise UserError(f"no text to analyse in {text.dataset!r}")
    effects = logit_effects(model, hook_name, dictionary.W_dec, cfg.n_logits)
    meta = StoreMeta(
        dictionary=dictionary_name,
        hook_name=hook_name,
        model_name=model_name,
        d_in=dictionary.d_in,
        d_sae=dictionary.d_sae,
        n_tokens=acc.n_tokens,
        n_top=cfg.n_top,
        n_quantiles=cfg.n_quantiles,
        examples_per_quantile=cfg.examples_per_quantile,
        context_before=cfg.context_before,
        context_after=cfg.context_after,
        histogram_edges=cfg.histogram_edges().tolist(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        generation=0,
        extra={
            "text": str(cache) if cache is not None else text.dataset,
            "split": text.split,
            "context_size": text.context_size,
            "architecture": dictionary.cfg.architecture,
            "pad_token_id": pad,
            "logit_effects": "direct path, unit decoder direction @ W_U (no final LN scale)"
            if effects is not None
            else None,
        },
    )
    vocab = token_strings(model.tokenizer, int(model.cfg.d_vocab))
    return acc.result(meta, vocab, effects)
