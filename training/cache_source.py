"""Training on an activation cache: the training rows and the held-out evaluation.

Held-out rows come from one of two places:
- a separate evaluation cache (`EvalConfig.cache`, e.g. `sae cache --text.split validation`):
  its first whole contexts (`activations.contexts.cache_head`); the whole training cache is
  trained on. Its documents are not in the training text, which is checked as far as the two
  caches' configs tell;
- otherwise the training cache's last whole contexts (`activations.contexts.cache_tail`), at
  least `EvalConfig.tokens` rows; the shuffled reader trains on the rows before them only.

A transcoder (`TrainConfig.transcoder.target`) reads its input and target hooks from the same
cache, row for row (`activations.reader.paired_shards`); its held-out rows are the same
contexts of both hooks.

`HeldOutEval` measures the final dictionary on them, with the cache's own model and contexts
for loss recovered. Every process reads the whole global batch and trains on its share
(training/distributed.py); only the main process evaluates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activations.cache_format import CONFIG_FILE, read_cache_config
from activations.contexts import HeldOutRows, cache_head, cache_tail
from activations.hooks import check_transcoder_hooks
from activations.reader import CachedActivations, CacheShards, paired_shards
from sae.errors import UserError
from training.config import TrainConfig
from training.heldout import HeldOutContexts, HeldOutEval

logger = logging.getLogger(__name__)


@dataclass
class CacheSource:
    """What `sae train --cache` trains on and evaluates with."""

    reader: CachedActivations
    """Shuffled batches of the training rows."""
    evaluator: HeldOutEval | None
    """Held-out evaluation (None on processes other than the main one)."""
    model_name: str | None
    """The model the cache was written from (from its cache_config.json), if known."""
    train_rows: int
    held_out_rows: int


def cache_source(
    cfg: TrainConfig, path: str | Path, hook_name: str | None, *, main: bool = True
) -> CacheSource:
    """Split off the held-out rows (or open the evaluation cache); build reader and evaluator."""
    target = cfg.transcoder.target
    shards = paired_shards(path, hook_name, target)[0] if target else CacheShards(path, hook_name)
    if target:
        check_transcoder_hooks(None, shards.hook_name, target)
    cache_cfg = read_cache_config(path)
    model_name = cache_cfg.get("model") if cache_cfg else None
    eval_text = (
        None if cfg.eval.cache is None else check_eval_cache(cfg.eval.cache, shards, cache_cfg)
    )
    want_loss = cfg.eval.loss_recovered and model_name is not None
    if cfg.eval.loss_recovered and model_name is None:
        logger.warning("no %s beside the cache: loss recovered is not measured", CONFIG_FILE)
    model = None
    fill = 0
    if main and want_loss:
        from activations.model import load_model
        from activations.text import special_ids

        model = load_model(str(model_name))
        fill = special_ids(model.tokenizer)[0]  # each context starts with it (the BOS row)
        if target:
            check_transcoder_hooks(model, shards.hook_name, target)
    held_out: HeldOutRows | None = None  # a transcoder's target rows of the held-out contexts
    if cfg.eval.cache is not None:
        held = cache_head(cfg.eval.cache, shards.hook_name, cfg.eval.tokens, fill)
        if target:
            paired_shards(cfg.eval.cache, shards.hook_name, target)
            held_out = cache_head(cfg.eval.cache, target, held.stop, fill)
        train_rows = shards.n_rows
        source = f"the first {held.stop:,} rows of the evaluation cache {cfg.eval.cache}"
        if eval_text and eval_text.get("split"):
            source += f" (split {eval_text['split']} of {eval_text.get('dataset')})"
    else:
        held = cache_tail(path, shards.hook_name, cfg.eval.resolved_tokens(shards.n_rows), fill)
        if target:
            held_out = cache_tail(path, target, held.stop - held.start, fill)
        train_rows = held.start
        source = f"the last {held.stop - held.start:,} rows of the training cache, not trained on"
    epochs = max(1, math.ceil(cfg.total_tokens / train_rows))
    reader = CachedActivations(
        path,
        shards.hook_name,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        epochs=epochs,
        rows=(0, train_rows),
        drop_last=True,
        target_hook=target,
    )
    if held_out is not None and (held_out.start, held_out.stop) != (held.start, held.stop):
        raise UserError(f"the held-out contexts of {shards.hook_name} and {target} differ "
                        f"(rows {held.start}-{held.stop} vs {held_out.start}-{held_out.stop})")  # fmt: skip
    evaluator = _evaluator(cfg, held, model, shards.hook_name, source, held_out) if main else None
    logger.info("training on %d cached rows, evaluating on %s (%d contexts)",
                train_rows, source, held.tokens.shape[0])  # fmt: skip
    if epochs > 1:
        logger.info(
            "%d tokens asked of %d training rows: %d epochs", cfg.total_tokens, train_rows, epochs
        )
    return CacheSource(reader, evaluator, model_name, train_rows, int(held.acts.shape[0]))


def _evaluator(
    cfg: TrainConfig,
    held: HeldOutRows,
    model: Any,
    hook: str,
    source: str,
    targets: HeldOutRows | None = None,
) -> HeldOutEval:
    return HeldOutEval(
        held.acts,
        targets=None if targets is None else targets.acts,
        hook_name_out=cfg.transcoder.target if targets is not None else None,
        model=model,
        hook_name=hook if model is not None else None,
        contexts=HeldOutContexts(held.tokens, held.valid) if model is not None else None,
        dense_threshold=cfg.logging.dense_threshold,
        source=source,
    )


def check_eval_cache(
    path: str | Path, train: CacheShards, train_cfg: dict[str, Any] | None
) -> dict[str, Any]:
    """A UserError unless `path` caches the training cache's hook of the same model, from
    other text than the training cache's; else the text options it was cached with."""
    if Path(path).resolve() in (Path(train.folder).resolve(), Path(train.folder).parent.resolve()):
        raise UserError(f"--eval.cache {path} is the training cache itself; give a cache of "
                        "held-out text, e.g. sae cache --text.split validation")  # fmt: skip
    held = CacheShards(path, train.hook_name)
    if held.d_in != train.d_in:
        raise UserError(f"--eval.cache {path} has d_in {held.d_in}, the training cache "
                        f"{train.d_in}: not the same hook")  # fmt: skip
    held_cfg = read_cache_config(path) or {}
    train_cfg = train_cfg or {}
    if held_cfg.get("model") != train_cfg.get("model"):
        raise UserError(f"--eval.cache {path} was written from model {held_cfg.get('model')}, "
                        f"the training cache from {train_cfg.get('model')}")  # fmt: skip
    keys = ("dataset", "dataset_config", "split", "seed", "sample_by", "context_size")
    same = [(held_cfg.get("text") or {}).get(k) == (train_cfg.get("text") or {}).get(k)
            for k in keys]  # fmt: skip
    if held_cfg.get("text") and all(same):
        raise UserError(f"--eval.cache {path} caches the same text as the training cache (same "
                        "dataset, split and seed): its contexts are trained on; cache another "
                        "split, e.g. --text.split validation")  # fmt: skip
    return held_cfg.get("text") or {}
