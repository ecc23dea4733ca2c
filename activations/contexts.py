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
        tokens, valid, uniq, (local, p) = _contexts(tok, seq, pos, T, fill_token)
        full = torch.zeros((uniq.numel(), T, acts.shape[-1]), dtype=acts.dtype)
        full[local, p] = acts
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


def _contexts(
    tok: Tensor, seq: Tensor, pos: Tensor, context_size: int, fill_token: int
) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Rows of consecutive contexts -> (tokens [C, T], valid [C, T], context ids [C], the
    (context, position) index of every row)."""
    uniq, local = torch.unique_consecutive(seq, return_inverse=True)
    C, p = uniq.numel(), pos.long()
    tokens = torch.full((C, context_size), fill_token, dtype=torch.long)
    tokens[local, p] = tok.long()
    valid = torch.zeros((C, context_size), dtype=torch.bool)
    valid[local, p] = True
    return tokens, valid, uniq, (local, p)


class HeldOutRows(NamedTuple):
    """Whole contexts of a cached hook, held out from training: their activations and tokens."""

    start: int
    """First row of them in stored order."""
    stop: int
    """One past their last row."""
    acts: Float[Tensor, "N D"]
    """Their activations, float32."""
    tokens: Int[Tensor, "C T"]
    """Their contexts' token ids (positions the cache dropped hold `fill_token`)."""
    valid: Bool[Tensor, "C T"]
    """Positions that have a row (False: BOS the cache left out)."""


def cache_tail(
    path: str | Path, hook_name: str | None, min_rows: int, fill_token: int
) -> HeldOutRows:
    """Hold out the cache's last whole contexts, at least `min_rows` rows, in stored order.

    The cut falls on a context boundary, so no context is split between training and
    evaluation; the held-out contexts are the end of the cached text stream (of the last rank,
    for a cache written under torchrun). A UserError if that leaves nothing to train on.
    """
    cache = CacheShards(path, hook_name)
    n = cache.n_rows
    if min_rows >= n // 2:
        raise UserError(
            f"activation cache {cache.folder} holds {n} rows: too few to hold out {min_rows} "
            "for evaluation and train on the rest; cache more tokens or lower --eval.tokens"
        )
    start = _context_start(cache, n - min_rows)
    if start == 0:
        raise UserError(f"activation cache {cache.folder}: one context spans the held-out rows")
    return _rows(cache, start, n, fill_token)


def cache_head(
    path: str | Path, hook_name: str | None, min_rows: int | None, fill_token: int
) -> HeldOutRows:
    """The first whole contexts of a cache written for evaluation only (e.g. of a validation
    split), at least `min_rows` rows, or every whole context if `min_rows` is None. A context
    the cache's end cut short is left out."""
    cache = CacheShards(path, hook_name)
    n = cache.n_rows
    seq = torch.cat([cache.meta_columns(i)["sequence"] for i in range(len(cache))])
    ends = [*(torch.nonzero(seq[1:] != seq[:-1]).squeeze(-1) + 1).tolist(), n]
    lengths = torch.tensor(ends) - torch.tensor([0, *ends[:-1]])
    if lengths[-1] < lengths.max():  # the cache's end cut the last context short
        ends = ends[:-1]
    whole = ends if min_rows is None else [e for e in ends if e >= min_rows][:1]
    if not whole:
        have = ends[-1] if ends else 0
        asked = "" if min_rows is None else f", fewer than the {min_rows} asked (--eval.tokens)"
        raise UserError(
            f"evaluation cache {cache.folder} holds {have} rows of whole contexts{asked}; "
            "cache more tokens of the held-out text"
        )
    stop = whole[-1]
    return _rows(cache, 0, stop, fill_token)


def _offsets(cache: CacheShards) -> list[int]:
    offsets = [0]
    for t in cache.activations:
        offsets.append(offsets[-1] + len(t))
    return offsets


def _sequence(cache: CacheShards, row: int) -> tuple[Tensor, int]:
    """The context ids of the shard holding `row` and the one before it, and their first row."""
    offsets = _offsets(cache)
    shard = max(i for i in range(len(cache)) if offsets[i] <= min(row, cache.n_rows - 1))
    lo = max(shard - 1, 0)  # the context holding `row` may have started a shard earlier
    seq = torch.cat([cache.meta_columns(i)["sequence"] for i in range(lo, shard + 1)])
    return seq, offsets[lo]


def _context_start(cache: CacheShards, row: int) -> int:
    """First row of the context holding `row` (`n_rows` counts as inside the last one)."""
    seq, base = _sequence(cache, row)
    i = min(row, cache.n_rows - 1) - base
    while i > 0 and seq[i - 1] == seq[i]:
        i -= 1
    return base + i


def _rows(cache: CacheShards, start: int, stop: int, fill_token: int) -> HeldOutRows:
    """Rows [start, stop) of whole contexts: activations, and the contexts' tokens."""
    offsets = _offsets(cache)
    shards = [k for k in range(len(cache)) if offsets[k + 1] > start and offsets[k] < stop]
    acts = torch.cat(
        [cache.activations[k][max(start - offsets[k], 0) : stop - offsets[k]].float()
         for k in shards]
    )  # fmt: skip
    meta = [cache.meta_columns(k) for k in shards]
    lo, hi = start - offsets[shards[0]], stop - offsets[shards[0]]
    tok, seq, pos = (torch.cat([m[c] for m in meta])[lo:hi]
                     for c in ("token_ids", "sequence", "position"))  # fmt: skip
    T = int(cache.manifest["context_size"])
    tokens, valid, _, _ = _contexts(tok, seq, pos, T, fill_token)
    return HeldOutRows(start, stop, acts, tokens, valid)
