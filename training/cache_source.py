"""Training on an activation cache: the training rows and the held-out evaluation.

The cache's last whole contexts (`EvalConfig.tokens` rows, at least) are held out
(`activations.contexts.cache_tail`); the shuffled reader trains on the rows before them only,
and `HeldOutEval` measures the final dictionary on the tail, with the cache's own model and
contexts for loss recovered. Every process reads the whole global batch and trains on its
share (training/distributed.py); only the main process evaluates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from activations.cache_format import CONFIG_FILE, read_cache_config
from activations.contexts import cache_tail
from activations.reader import CachedActivations, CacheShards
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
    """Split the cache into training rows and a held-out tail; build reader and evaluator."""
    shards = CacheShards(path, hook_name)
    cache_cfg = read_cache_config(path)
    model_name = cache_cfg.get("model") if cache_cfg else None
    n_eval = cfg.eval.resolved_tokens(shards.n_rows)
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
    tail = cache_tail(path, shards.hook_name, n_eval, fill)
    train_rows = tail.start
    epochs = max(1, math.ceil(cfg.total_tokens / train_rows))
    reader = CachedActivations(
        path,
        shards.hook_name,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        epochs=epochs,
        rows=(0, train_rows),
        drop_last=True,
    )
    evaluator = None
    if main:
        evaluator = HeldOutEval(
            tail.acts,
            model=model,
            hook_name=shards.hook_name if model is not None else None,
            contexts=HeldOutContexts(tail.tokens, tail.valid) if model is not None else None,
            dense_threshold=cfg.logging.dense_threshold,
        )
    logger.info(
        "training on %d cached rows, evaluating on the last %d (%d contexts)",
        train_rows,
        tail.acts.shape[0],
        tail.tokens.shape[0],
    )
    if epochs > 1:
        logger.info(
            "%d tokens asked of %d training rows: %d epochs", cfg.total_tokens, train_rows, epochs
        )
    return CacheSource(reader, evaluator, model_name, train_rows, int(tail.acts.shape[0]))
