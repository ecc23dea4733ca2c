"""Activations of whole contexts, with their tokens: what feature analysis reads.

Two sources give the same `ActivationBatch`es: a pass of text through the model
(`model_activations`), or contexts rebuilt in order from an activation cache, which stores each
row's token id, context index and position (`cached_activations`, on the reader core
`activations.reader.CacheShards`: no model forward at all).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from activations.hooks import ActivationCapture
from activations.prefetch import in_background
from activations.reader import CacheShards
from activations.text import context_batches
from sae.errors import UserError


class ActivationBatch(NamedTuple):
    """Activations of whole contexts at one hook, with their token ids."""

    tokens: Int[Tensor, "S T"]
    sequence: Int[Tensor, " S"]
    acts: Float[Tensor, "S T D"]
    valid: Bool[Tensor, "S T"] | None = None
    """False where the source has no activation (a cache that dropped BOS rows)."""


def model_activations(
    model: Any, hook_name: str, text: Any, n_tokens: int, device: torch.device | str
) -> Iterator[ActivationBatch]:
    """Run contexts of `text` (a TextConfig) through the model, yielding the hook's
    activations until `n_tokens` tokens (whole contexts) have been produced."""
    max_contexts = -(-n_tokens // text.context_size)
    batches = context_batches(text, model.tokenizer, max_contexts=max_contexts)
    with ActivationCapture(model, [hook_name]) as capture:
        # Tokenize on a background thread, ahead of the forward pass.
        for batch in in_background(batches, depth=4):
            tokens = batch.tokens.to(device)
            acts = capture(tokens)[hook_name]
            yield ActivationBatch(tokens, batch.sequence, acts)


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
    cache = CacheShards(path, hook_name)
    if cache.hook_name != hook_name:
        raise UserError(f"activation cache {cache.folder} holds {cache.hook_name!r}, "
                        f"not {hook_name!r}")  # fmt: skip
    T = int(cache.manifest["context_size"])
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

    for shard, shard_acts in enumerate(cache.activations):
        meta = cache.meta_columns(shard)
        cols = [shard_acts, meta["token_ids"], meta["sequence"], meta["position"]]
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
