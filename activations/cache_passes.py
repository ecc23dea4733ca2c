"""Passes of `sae cache` over the text: computing a range of one rank's shards, finding the
damaged ones, and computing exactly those again.

Shard k of a rank holds rows [k * shard_tokens, (k + 1) * shard_tokens) of the rank's
deterministic row stream; a pass starts at the batch boundary before its first shard's first
context, so the model sees the batches an uninterrupted run saw and a rewritten shard comes
out byte for byte as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from activations.cache_format import file_sha256, shard_name, shard_problem, verify_shard
from activations.cache_writer import ShardBuffers, ShardWriter
from activations.prefetch import in_background
from activations.text import context_batches
from sae.progress import progress_bar

if TYPE_CHECKING:
    from activations.cache import CacheConfig

logger = logging.getLogger(__name__)


class Plan(NamedTuple):
    """Row accounting of one rank: which contexts it runs and how many rows they give."""

    rows_per_context: int
    max_contexts: int | None
    """Bound on the global context stream (from max_tokens); None: the whole dataset."""
    last_rows: int
    """Rows kept from the global context max_contexts - 1 (max_tokens need not fill it)."""


class Run(NamedTuple):
    """What every pass over the text of one caching run shares."""

    cfg: CacheConfig
    model: Any
    names: list[str]
    folders: dict[str, Path]
    widths: dict[str, int]
    shard_tokens: int
    rank: int
    world: int
    plan: Plan


def compute_shards(
    run: Run,
    writer: ShardWriter,
    first: int,
    last: int | None = None,
    keep: Callable[[int, str], bool] | None = None,
    bar: Any = None,
) -> tuple[int, int]:
    """Compute shards first..last (None: to the end of the stream) of this rank and hand the
    ones `keep` picks to the writer. Returns (index after the last shard, rows computed).

    The pass starts at the batch boundary (of text.batch_size contexts, counted from this
    rank's first context) at or before the shard's first context, so the model sees the
    batches an uninterrupted run saw.
    """
    from activations.hooks import ActivationCapture

    cfg, plan = run.cfg, run.plan
    device = next(run.model.parameters()).device
    first_row = first * run.shard_tokens
    start = first_row // plan.rows_per_context // cfg.text.batch_size * cfg.text.batch_size
    skip_rows = first_row - start * plan.rows_per_context
    p0 = 1 if cfg.drop_bos else 0
    T = cfg.text.context_size
    positions = torch.arange(p0, T, dtype=torch.int32)
    shards = ShardBuffers(run.folders, run.widths, run.shard_tokens, run.rank, first, writer, keep)
    contexts = context_batches(
        cfg.text,
        run.model.tokenizer,
        rank=run.rank,
        world_size=run.world,
        start=start,
        max_contexts=plan.max_contexts,
    )
    new_rows = 0
    # Tokenize on a thread, ahead of the forward pass, so it costs no model time.
    batches = in_background(contexts, depth=8)
    try:
        with ActivationCapture(run.model, run.names) as capture:
            for batch in batches:
                acts = capture(batch.tokens.to(device))
                S = batch.tokens.shape[0]
                # The rows kept are one range: the rows before `first`'s are skipped,
                # max_tokens cuts the end of the global last context, which ends its batch.
                lo = min(skip_rows, S * (T - p0))
                hi = S * (T - p0)
                skip_rows -= lo
                if plan.max_contexts is not None and batch.sequence[-1] == plan.max_contexts - 1:
                    hi -= plan.rows_per_context - plan.last_rows
                if lo < hi:
                    meta = {
                        "token_ids": batch.tokens[:, p0:].reshape(-1)[lo:hi].to(torch.int32),
                        "sequence": batch.sequence[:, None].expand(S, T - p0).reshape(-1)[lo:hi],
                        "position": positions.expand(S, T - p0).reshape(-1)[lo:hi],
                    }
                    shards.add(
                        {
                            n: a[:, p0:].reshape(S * (T - p0), -1)[lo:hi].float().cpu()
                            for n, a in acts.items()
                        },
                        meta,
                    )
                    new_rows += hi - lo
                    if bar is not None:
                        bar.update(hi - lo)
                if last is not None and shards.next_index > last:
                    return shards.next_index, new_rows
    finally:
        getattr(batches, "close", lambda: None)()  # stops the tokenizer thread
    shards.flush()
    return shards.next_index, new_rows


def find_damage(
    run: Run, parts: dict[str, dict[str, Any]], verify: bool
) -> dict[int, dict[str, str]]:
    """{shard index: {hook: problem}} over this rank's finished shards (sizes; with `verify`
    the checksums too)."""
    damaged: dict[int, dict[str, str]] = {}
    entries = [(n, i, e) for n in run.names for i, e in enumerate(parts[n]["shards"])]
    unchecked = sum(1 for *_, e in entries if "sha256" not in e)
    if unchecked:
        logger.info(
            "%d shard(s) have no recorded checksum (a cache written before checksums): %s",
            unchecked,
            "recording them now, their contents cannot be checked"
            if verify
            else "sizes are checked from their headers; --verify records checksums",
        )
    for name, i, entry in progress_bar(
        entries, desc="verifying", unit="shard", disable=not verify, leave=False
    ):
        path = run.folders[name] / entry["file"]
        problem = verify_shard(path, entry) if verify else shard_problem(path, entry)
        if problem is not None:
            damaged.setdefault(i, {})[name] = problem
    return damaged


def known_digests(run: Run, parts: dict[str, dict[str, Any]], verify: bool) -> dict[Path, Any]:
    """Size and checksum of each listed shard, from the part manifests (hashed now, with
    `verify`, where an older part has none)."""
    digests: dict[Path, Any] = {}
    for name in run.names:
        for entry in parts[name]["shards"]:
            path = run.folders[name] / entry["file"]
            if "sha256" in entry:
                digests[path] = {"bytes": entry["bytes"], "sha256": entry["sha256"]}
            elif verify and path.is_file():
                digests[path] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return digests


def repair(
    run: Run, writer: ShardWriter, damaged: dict[int, dict[str, str]]
) -> tuple[tuple[str, ...], int]:
    """Compute the damaged shards again and rewrite exactly those files."""
    names = tuple(
        f"{hook}/{shard_name(run.rank, i)}: {problem}"
        for i in sorted(damaged)
        for hook, problem in damaged[i].items()
    )
    logger.warning("rewriting %d damaged shard(s): %s", len(names), "; ".join(names))
    rows = 0
    for first, last in ranges(sorted(damaged)):
        _, n = compute_shards(
            run, writer, first, last, keep=lambda i, hook: hook in damaged.get(i, {})
        )
        rows += n
    return names, rows


def ranges(indices: list[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7] -> [(1, 3), (7, 7)]: consecutive shards are computed in one pass."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out
