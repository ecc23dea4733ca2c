"""`sae train-lm`: train the bundled language model from scratch on CPU.

The setting of Anthropic's "Towards Monosemanticity" (2023) in miniature: a one-layer
transformer with a 512-neuron MLP and residual width 128, here trained on the Python standard
library (activations/corpus.py). Steps:

1. train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on the train split;
2. tokenize both splits into one stream each, every document preceded by `<|endoftext|>`;
3. train a standard `transformers` GPT-2 (AdamW, linear warm-up then cosine decay) on random
   windows of that stream, each context starting with the BOS token as `to_tokens` does;
4. measure validation cross-entropy next to the unigram entropy of the same target tokens;
5. write a Hugging Face directory (safetensors + tokenizer.json), metrics JSON and model card.

A killed run resumes from its last checkpoint in the work directory: the batch of step `s` is
drawn from a generator seeded by (seed, s), so a resumed run sees the same data.

This module is the optimisation loop, the run driver and the CLI; the configuration is
lm/config.py, the tokenizer and token streams lm/data.py, and the
evaluation and model card lm/evaluation.py (their public names are re-exported here).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int

from activations.model import BUNDLED_DIR
from lm.config import TrainLMConfig, config_hash, native_bf16, resolve_autocast
from lm.data import (
    PreparedData,
    prepare_data,
    sample_batch,
    validation_windows,
)
from lm.evaluation import (
    greedy_sample,
    model_card,
    portable_tokenizer_config,
    unigram_entropy,
    validation_loss,
)
from lm.optim import make_optimizer
from sae.devices import DTYPES
from sae.errors import UserError

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast


logger = logging.getLogger(__name__)

SAMPLE_PROMPTS = ("def ", "import ", "class ", "    for ")


def lr_at(step: int, cfg: TrainLMConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def build_model(cfg: TrainLMConfig, tokenizer: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    hf_cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_ctx,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_mlp,
        tie_word_embeddings=cfg.tie_embeddings,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.device(cfg.device):
        return GPT2LMHeadModel(hf_cfg)


def default_work_dir(cfg: TrainLMConfig) -> Path:
    return Path.home() / ".cache" / "sae" / "train-lm" / config_hash(cfg)


def claim_work_dir(work: Path, run_id: str) -> None:
    """Mark `work` as belonging to this configuration; a different one must not resume here."""
    from sae.atomic import atomic_write_json

    marker = work / "run.json"
    if marker.is_file():
        found = json.loads(marker.read_text()).get("config_hash")
        if found != run_id:
            raise UserError(
                f"work directory {work} holds a run with a different configuration "
                f"({found} != {run_id}); pass another --work-dir or delete it"
            )
        logger.info("work directory %s (resuming run %s)", work, run_id)
        return
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"config_hash": run_id})
    logger.info("work directory %s (new run %s)", work, run_id)


def compiled(model: GPT2LMHeadModel, cfg: TrainLMConfig) -> Any:
    """The training forward: `torch.compile(model)` if asked and possible, else the model.

    The compiled module shares its parameters with `model`, so checkpoints, evaluation and
    `save_pretrained` keep using the plain module.
    """
    if not cfg.compile:
        return model
    compilers = (os.environ.get("CXX", ""), "g++", "clang++")
    if torch.device(cfg.device).type == "cpu" and not any(c and shutil.which(c) for c in compilers):
        raise UserError(
            "--compile true needs a C++ compiler (g++ or clang++) on CPU: "
            "install one or pass --compile false"
        )
    return torch.compile(model)


def train_step(
    forward: Any,
    optimizer: torch.optim.Optimizer,
    x_BS: Int[torch.Tensor, "B S"],
    cfg: TrainLMConfig,
    step: int,
) -> float:
    """One optimizer step of next-token cross-entropy on `x_BS`; returns the loss.

    `forward` is the model or its compiled wrapper (`compiled`); the forward pass runs under
    `cfg.autocast` (a dtype: `run_training` resolves `auto` once), the backward pass and the
    optimizer in the float32 of the weights.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    # Dropout masks are a function of (seed, step), like the batch, so a resumed run is exact.
    torch.manual_seed(cfg.seed * 1_000_003 + step)
    device_type = torch.device(cfg.device).type
    dtype = DTYPES[cfg.autocast]
    with torch.autocast(device_type, dtype, enabled=cfg.autocast != "float32"):
        loss = forward(input_ids=x_BS, labels=x_BS).loss
    loss.backward()
    if cfg.grad_clip > 0:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.item())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    from sae.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def train_model(
    cfg: TrainLMConfig, data: PreparedData, work: Path
) -> tuple[GPT2LMHeadModel, dict[str, Any]]:
    """The optimisation loop, resuming from `work/checkpoint.pt` if a previous run left one."""
    from sae.progress import progress_bar

    if len(data.train) < cfg.n_ctx:
        raise UserError(f"the train split has fewer than n_ctx={cfg.n_ctx} tokens")
    model = build_model(cfg, data.tokenizer)
    optimizer = make_optimizer(model, cfg)
    ckpt_path = work / "checkpoint.pt"
    state: dict[str, Any] = {"step": 0, "seconds": 0.0, "loss": float("nan")}
    if ckpt_path.is_file():
        saved = torch.load(ckpt_path, map_location=cfg.device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        logger.info("resuming from step %d of %d (%s)", state["step"], cfg.steps, ckpt_path)

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_path,
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
        )

    bos = data.tokenizer.bos_token_id
    tokens_per_step = cfg.batch_size * cfg.n_ctx
    forward = compiled(model, cfg)
    bar = progress_bar(total=cfg.steps, initial=state["step"], desc="train-lm", unit="step")
    model.train()
    tick = time.perf_counter()
    try:
        while state["step"] < cfg.steps:
            step = int(state["step"])
            x_BS = sample_batch(data.train, bos, cfg, step).to(cfg.device)
            loss = train_step(forward, optimizer, x_BS, cfg, step)
            now = time.perf_counter()
            state = {"step": step + 1, "seconds": state["seconds"] + now - tick, "loss": loss}
            tokens_per_s = tokens_per_step / max(now - tick, 1e-9)
            tick = now
            bar.update(1)
            bar.set_postfix(loss=f"{state['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            if state["step"] % cfg.checkpoint_every == 0 and state["step"] < cfg.steps:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()  # so the next run resumes here, not at the last periodic checkpoint
        raise
    finally:
        bar.close()
    checkpoint()
    stats = {
        "steps": state["step"],
        "tokens_seen": state["step"] * tokens_per_step,
        "train_seconds": round(state["seconds"], 1),
        "final_train_loss": round(state["loss"], 4),
    }
    return model, stats


def run_training(cfg: TrainLMConfig, command: str = "sae train-lm") -> dict[str, Any]:
    """Train tokenizer and model, evaluate, and write `cfg.out` atomically. Returns metrics."""
    out = Path(cfg.out)
    if (
        out.exists()
        and (not out.is_dir() or any(out.iterdir()))
        and not (out / "config.json").is_file()
    ):
        raise UserError(f"refusing to replace {out}: it exists and is not a model directory")
    cfg = resolve_autocast(cfg)
    logger.info("training forward pass in %s on %s", cfg.autocast, cfg.device)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_evaluate_write(cfg, out, command)
    finally:
        torch.set_num_threads(previous_threads)  # a library call leaves the process as it was


def _train_evaluate_write(cfg: TrainLMConfig, out: Path, command: str) -> dict[str, Any]:
    from sae.atomic import atomic_dir, atomic_write_json, atomic_write_text
    from sae.dataclass_cli import to_dict

    work = Path(cfg.work_dir) if cfg.work_dir else default_work_dir(cfg)
    claim_work_dir(work, config_hash(cfg))
    data = prepare_data(cfg, work)
    model, stats = train_model(cfg, data, work)
    eval_started = time.perf_counter()
    bos, body = data.tokenizer.bos_token_id, cfg.n_ctx - 1
    sliding = validation_windows(data.validation, bos, cfg.n_ctx, cfg.stride)
    val_ce = validation_loss(model, sliding, cfg.eval_batch_size)
    # Both sets of windows score every validation token once: one unigram entropy for both.
    disjoint = validation_windows(data.validation, bos, cfg.n_ctx, body)
    targets = sliding.targets()
    metrics: dict[str, Any] = {
        "name": "stdlib-1l-512" if out.resolve() == BUNDLED_DIR else out.name,
        "command": command,
        "val_ce_nats_per_token": round(val_ce, 4),
        "val_ce_disjoint_windows_nats_per_token": round(
            validation_loss(model, disjoint, cfg.eval_batch_size), 4
        ),
        "eval_stride": cfg.stride,
        "val_min_context": body - cfg.stride,
        "unigram_entropy_nats_per_token": round(unigram_entropy(targets, len(data.tokenizer)), 4),
        "val_tokens": len(targets),
        **stats,
        "vocab_size": len(data.tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        # Wall-clock times mean little on a shared machine without its load next to them.
        "machine": (
            f"{os.cpu_count()} CPUs, native bf16 {'yes' if native_bf16(cfg.device) else 'no'}, "
            f"load average {os.getloadavg()[0]:.1f} at the end"
        ),
        "samples": {
            p: greedy_sample(model, data.tokenizer, p, cfg.sample_tokens) for p in SAMPLE_PROMPTS
        },
        "corpus": data.corpus,
        "config": {k: v for k, v in to_dict(cfg).items() if k not in ("out", "work_dir")},
    }
    # Summed over resumed sessions: tokenizer + optimisation + this final evaluation.
    metrics["total_seconds"] = round(
        data.corpus["tokenizer_seconds"]
        + stats["train_seconds"]
        + time.perf_counter()
        - eval_started,
        1,
    )
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        data.tokenizer.save_pretrained(tmp)
        portable_tokenizer_config(tmp)
        atomic_write_json(tmp / "training_metrics.json", metrics)
        atomic_write_text(tmp / "README.md", model_card(metrics))
    logger.info(
        "val CE %.4f nats/token (unigram %.4f); wrote %s",
        val_ce,
        metrics["unigram_entropy_nats_per_token"],
        out,
    )
    return metrics
