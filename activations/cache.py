"""`sae cache`: run a model over packed text once and keep every hooked activation on disk.

The files are laid out as activations/cache_format.py describes; activations/cache_writer.py
writes the shards and manifests. This module drives a run: check the model, hooks and text,
pick the shard size, refuse a folder holding another run, resume a killed one, and feed every
context's activations to the writer.

Nothing lost, nothing doubled: shard k of a rank always holds rows [k * shard_tokens,
(k + 1) * shard_tokens) of that rank's deterministic row stream, and a shard file exists only
once complete. A run killed at any moment restarts after the last shard that every hook
completed, skipping the covered contexts without running the model on them.

Past one machine: under `torchrun` each rank takes every world_size-th context of the same
stream (`activations.text.context_batches`) and writes its own shards and part manifest into
the same folders; whichever rank finishes last merges the parts into one manifest.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from activations.cache_format import (
    CONFIG_FILE,
    COUNT_FILE,
    FORMAT,
    FORMAT_VERSION,
    META_BYTES_PER_ROW,
    StorageDtype,
    hook_dir,
    part_name,
    shard_name,
)
from activations.cache_writer import (
    ShardBuffers,
    ShardWriter,
    check_free_disk,
    merge_manifest,
    write_part_manifest,
)
from activations.prefetch import in_background
from activations.text import TextConfig, check_source, context_batches, iter_contexts
from sae.atomic import atomic_write_json
from sae.dataclass_cli import to_dict
from sae.devices import DTYPES, resolve_device
from sae.errors import UserError
from sae.progress import progress_bar

logger = logging.getLogger(__name__)

SHARD_TARGET_BYTES = 128 * 2**20
"""Auto shard size: about this many bytes of activations for the widest hook."""


@dataclass
class CacheConfig:
    """One caching run: which model, which hooks, which text, how to store it."""

    out: Path = Path("activation_cache")
    """Cache folder; an interrupted run in it is resumed."""
    model: str = "stdlib-1l-512"
    """Model: the bundled short name, a local Hugging Face directory, or a hub name."""
    hooks: tuple[str, ...] = ("blocks.0.mlp.hook_post",)
    """TransformerLens hook names, all cached in one forward pass."""
    text: TextConfig = field(default_factory=TextConfig)
    """The text source and packing (nested options --text.*)."""
    dtype: StorageDtype = "bfloat16"
    """Stored activation dtype. bfloat16 halves the disk of float32 (SAELens's default) with
    float32's range, so residual-stream outliers cannot overflow as they can in float16."""
    max_tokens: int | None = None
    """Stop after this many cached tokens (rows per hook, over all ranks); None: whole split."""
    shard_tokens: int = 0
    """Rows per shard; 0 picks about 128 MiB of the widest hook."""
    drop_bos: bool = True
    """Leave out position 0 (the BOS token of every context): its norm is an outlier that
    dominates reconstruction losses and says nothing about the text."""
    device: str = "auto"
    """Device to run the model on; auto: cuda (this rank's LOCAL_RANK), else mps, else cpu."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in."""
    overwrite: bool = False
    """Replace a cache of a different run in `out` instead of refusing."""

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {self.max_tokens}")
        if self.shard_tokens < 0:
            raise ValueError(f"shard_tokens must be >= 0, got {self.shard_tokens}")
        if not self.hooks:
            raise ValueError("hooks must name at least one hook")


class CacheResult(NamedTuple):
    """What a caching run produced (for this rank)."""

    path: Path
    """The cache folder."""
    hook_dirs: dict[str, Path]
    """Folder of each hook (open with `CachedActivations`)."""
    n_tokens: int
    """Rows per hook this rank holds."""
    new_tokens: int
    """Rows computed by this call (less than n_tokens after a resume)."""
    seconds: float


class _Plan(NamedTuple):
    """Row accounting of one rank: which contexts it runs and how many rows they give."""

    rows_per_context: int
    max_contexts: int | None
    """Bound on the global context stream (from max_tokens); None: the whole dataset."""
    last_rows: int
    """Rows kept from the global context max_contexts - 1 (max_tokens need not fill it)."""


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from the torchrun environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# -- resume bookkeeping ---------------------------------------------------------------------


def _fingerprint(cfg: CacheConfig, shard_tokens: int, world_size: int) -> dict[str, Any]:
    """Everything that decides the bytes of the cache (not device, batch size, overwrite)."""
    text = to_dict(cfg.text)
    text.pop("batch_size")
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": cfg.model,
        "model_dtype": cfg.model_dtype,
        "hooks": list(cfg.hooks),
        "text": text,
        "dtype": cfg.dtype,
        "max_tokens": cfg.max_tokens,
        "shard_tokens": shard_tokens,
        "drop_bos": cfg.drop_bos,
        "world_size": world_size,
    }


def _prepare_out(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
    """Refuse (or with overwrite, clear) a folder holding anything but this same run."""
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        if old == fingerprint:
            return
        if not overwrite:
            changed = sorted(
                k for k in fingerprint.keys() | old.keys() if old.get(k) != fingerprint.get(k)
            )
            raise UserError(
                f"{out} holds a cache of a different run (differs in {', '.join(changed)}); "
                "pick another --out or pass --overwrite true"
            )
        for name in old.get("hooks", []):
            shutil.rmtree(hook_dir(out, name), ignore_errors=True)
        (out / COUNT_FILE).unlink(missing_ok=True)
        config_path.unlink()
    elif out.exists():
        # Another rank of the same torchrun job may be a moment ahead: its hook folders and
        # temporary files are expected here, anything else is someone else's data.
        ours = {*fingerprint["hooks"], COUNT_FILE}
        foreign = [
            p.name
            for p in out.iterdir()
            if p.name not in ours and not (p.name.startswith(".") and p.name.endswith(".tmp"))
        ]
        if foreign:
            raise UserError(
                f"{out} is not empty and is not an activation cache (holds {foreign[0]}); "
                "pick another --out"
            )
    atomic_write_json(config_path, fingerprint)


def _complete_shards(folder: Path, rank: int) -> int:
    """Number of this rank's shards 0, 1, 2, ... present (renamed, hence complete)."""
    for leftover in folder.glob(f".shard-{rank:02d}-*.tmp"):
        leftover.unlink(missing_ok=True)  # a temp file of a killed run: never complete
    n = 0
    while (folder / shard_name(rank, n)).is_file():
        n += 1
    return n


def _plan(cfg: CacheConfig) -> _Plan:
    rows = cfg.text.context_size - (1 if cfg.drop_bos else 0)
    if cfg.max_tokens is None:
        return _Plan(rows, None, rows)
    n = math.ceil(cfg.max_tokens / rows)
    return _Plan(rows, n, cfg.max_tokens - (n - 1) * rows)


def _rank_rows(plan: _Plan, n_contexts: int, rank: int, world: int) -> int:
    """Rows this rank caches when the global stream has n_contexts contexts."""
    mine = len(range(rank, n_contexts, world))
    rows = mine * plan.rows_per_context
    truncated = plan.max_contexts is not None and n_contexts == plan.max_contexts > 0
    if truncated and (n_contexts - 1) % world == rank:
        rows -= plan.rows_per_context - plan.last_rows
    return rows


def _count_contexts(cfg: CacheConfig, tokenizer: Any) -> int | None:
    """Contexts in the whole split, by a tokenize-only pass, for a local or bundled source.

    Needed for an exact free-disk check and an ETA when no max_tokens is given. The count is
    kept in the cache folder, so a resumed run does not tokenize everything twice more.
    """
    if cfg.text.dataset != "bundled" and not Path(cfg.text.dataset).expanduser().exists():
        return None  # a hub dataset: counting means downloading it
    saved = Path(cfg.out) / COUNT_FILE
    if saved.is_file():
        return int(json.loads(saved.read_text())["n_contexts"])
    logger.info("counting the dataset's contexts first (pass --max-tokens to skip this)")
    n = 0
    for _ in progress_bar(
        iter_contexts(cfg.text, tokenizer), desc="counting contexts", unit="ctx", leave=False
    ):
        n += 1
    atomic_write_json(saved, {"n_contexts": n})
    return n


# -- the run --------------------------------------------------------------------------------


def cache_activations(
    cfg: CacheConfig, model: Any = None, rank: int | None = None, world_size: int | None = None
) -> CacheResult:
    """Cache cfg.hooks for cfg.text into cfg.out (resuming a killed run). See module doc.

    `model` may be passed to reuse an already loaded TransformerBridge; rank / world_size
    default to the torchrun environment.
    """
    from activations.hooks import ActivationCapture, check_hook_names, hook_widths

    start_time = time.perf_counter()
    env_rank, env_world = dist_info()
    rank = env_rank if rank is None else rank
    world = env_world if world_size is None else world_size
    if not 0 <= rank < world:
        raise UserError(f"rank {rank} is outside world size {world}")
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    if model is None:
        from activations.model import load_model

        model = load_model(cfg.model, device=device, dtype=DTYPES[cfg.model_dtype])
    device = next(model.parameters()).device
    names = check_hook_names(model, cfg.hooks)
    if cfg.text.context_size > model.cfg.n_ctx:
        raise UserError(
            f"context_size {cfg.text.context_size} exceeds the model's context {model.cfg.n_ctx}"
        )
    check_source(cfg.text)
    widths = hook_widths(model, names)
    itemsize = DTYPES[cfg.dtype].itemsize
    shard_tokens = cfg.shard_tokens or max(
        1024, SHARD_TARGET_BYTES // (max(widths.values()) * itemsize) // 1024 * 1024
    )
    _prepare_out(out, _fingerprint(cfg, shard_tokens, world), cfg.overwrite)
    folders = {n: hook_dir(out, n) for n in names}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    base = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": cfg.model,
        "dataset": to_dict(cfg.text),
        "dtype": cfg.dtype,
        "context_size": cfg.text.context_size,
        "drop_bos": cfg.drop_bos,
        "shard_tokens": shard_tokens,
        "world_size": world,
    }
    bases = {n: {**base, "hook_name": n, "d_in": widths[n]} for n in names}

    if all((folders[n] / part_name(rank)).is_file() for n in names):
        logger.info("rank %d of %s is already complete", rank, out)
        for n in names:
            merge_manifest(folders[n], bases[n], world)
        held = json.loads((folders[names[0]] / part_name(rank)).read_text())["n_tokens"]
        return CacheResult(out, folders, held, 0, time.perf_counter() - start_time)

    done_shards = min(_complete_shards(folders[n], rank) for n in names)
    done_rows = done_shards * shard_tokens
    plan = _plan(cfg)
    n_contexts = plan.max_contexts
    if n_contexts is None:
        n_contexts = _count_contexts(cfg, model.tokenizer)
    total = None if n_contexts is None else _rank_rows(plan, n_contexts, rank, world)
    bytes_per_row = sum(w * itemsize + META_BYTES_PER_ROW for w in widths.values())
    if total is not None:
        check_free_disk(out, max(total - done_rows, 0) * bytes_per_row)
    else:
        logger.warning("dataset size unknown: free disk is checked before each shard only")
    if done_rows:
        logger.info("resuming after %d complete shard(s): %d rows per hook", done_shards, done_rows)

    skip_contexts, skip_rows = divmod(done_rows, plan.rows_per_context)
    p0 = 1 if cfg.drop_bos else 0
    T = cfg.text.context_size
    positions = torch.arange(p0, T, dtype=torch.int32)
    writer = ShardWriter(DTYPES[cfg.dtype], {"format": FORMAT})
    shards = ShardBuffers(folders, widths, shard_tokens, rank, done_shards, writer)
    new_rows = 0
    bar = progress_bar(total=total, initial=done_rows, unit="tok", unit_scale=True, desc="caching")
    contexts = context_batches(
        cfg.text,
        model.tokenizer,
        rank=rank,
        world_size=world,
        start=skip_contexts,
        max_contexts=plan.max_contexts,
    )
    try:
        with ActivationCapture(model, names) as capture:
            # Tokenize on a thread, ahead of the forward pass, so it costs no model time.
            for batch in in_background(contexts, depth=8):
                acts = capture(batch.tokens.to(device))
                S = batch.tokens.shape[0]
                # The rows kept are one range: a resume skips a prefix of the first batch,
                # max_tokens cuts the end of the global last context, which ends its batch.
                lo, hi = skip_rows, S * (T - p0)
                skip_rows = 0
                if plan.max_contexts is not None and batch.sequence[-1] == plan.max_contexts - 1:
                    hi -= plan.rows_per_context - plan.last_rows
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
                new_rows += max(hi - lo, 0)
                bar.update(max(hi - lo, 0))
        shards.flush()
    finally:
        bar.close()
        writer.close()

    held = 0
    for n in names:
        held = write_part_manifest(folders[n], rank, shards.next_index)["n_tokens"]
        merged = merge_manifest(folders[n], bases[n], world)
    if world > 1 and not merged:
        logger.info("rank %d done; the last rank to finish writes the merged manifest", rank)
    seconds = time.perf_counter() - start_time
    logger.info("cached %d tokens x %d hook(s) in %.1f s into %s", held, len(names), seconds, out)
    return CacheResult(out, folders, held, new_rows, seconds)
