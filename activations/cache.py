"""`sae cache`: run a model over packed text once and keep every hooked activation on disk.

The files are laid out as activations/cache_format.py describes; activations/cache_writer.py
writes the shards and manifests. This module drives a run: check the model, hooks and text,
pick the shard size, refuse a folder holding another run, resume a killed one, and feed every
context's activations to the writer.

Nothing lost, nothing doubled: shard k of a rank always holds rows [k * shard_tokens,
(k + 1) * shard_tokens) of that rank's deterministic row stream, and a shard file exists only
once complete. A run killed at any moment restarts after the last shard that every hook
completed, skipping the covered contexts without running the model on them. The same holds
for damage: a shard that is missing, of the wrong size, or (with --verify) of the wrong
checksum is named and computed again on its own, from the contexts that hold its rows, in
batches aligned as the first run had them, so it comes out as it was.

One process writes a cache folder at a time (`sae.locks`; each rank of a torchrun job holds its
own lock), and a refused run leaves nothing behind: the free disk is checked before the
first file is written.

Past one machine: under `torchrun` each rank takes every world_size-th context of the same
stream (`activations.text.context_batches`) and writes its own shards and part manifest into
the same folders; whichever rank finishes last merges the parts into one manifest.json.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from activations.cache_folder import (
    check_out,
    complete_shards,
    fingerprint_of,
    folder_bytes,
    lock_name,
    start_out,
)
from activations.cache_format import (
    COUNT_FILE,
    FORMAT,
    FORMAT_VERSION,
    META_BYTES_PER_ROW,
    StorageDtype,
    hook_dir,
    part_name,
    shard_name,
    shard_problem,
)
from activations.cache_passes import Plan, Run, compute_shards, find_damage, known_digests, repair
from activations.cache_writer import (
    ShardWriter,
    merge_manifest,
    write_part_manifest,
)
from activations.text import TextConfig, check_source, iter_contexts
from sae.atomic import atomic_write_json, check_free_disk
from sae.dataclass_cli import to_dict
from sae.devices import DTYPES, resolve_device
from sae.errors import UserError
from sae.locks import hold_folder
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
    verify: bool = False
    """Check every shard's checksum (not only its size) and rewrite the damaged ones."""

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
    repaired: tuple[str, ...] = ()
    """Damaged shards this call rewrote ("hook/shard-..: problem")."""


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from the torchrun environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _plan(cfg: CacheConfig) -> Plan:
    rows = cfg.text.context_size - (1 if cfg.drop_bos else 0)
    if cfg.max_tokens is None:
        return Plan(rows, None, rows)
    n = math.ceil(cfg.max_tokens / rows)
    return Plan(rows, n, cfg.max_tokens - (n - 1) * rows)


def _rank_rows(plan: Plan, n_contexts: int, rank: int, world: int) -> int:
    """Rows this rank caches when the global stream has n_contexts contexts."""
    mine = len(range(rank, n_contexts, world))
    rows = mine * plan.rows_per_context
    truncated = plan.max_contexts is not None and n_contexts == plan.max_contexts > 0
    if truncated and (n_contexts - 1) % world == rank:
        rows -= plan.rows_per_context - plan.last_rows
    return rows


def _count_contexts(cfg: CacheConfig, tokenizer: Any) -> tuple[int | None, bool]:
    """(contexts in the whole split, whether that was counted now) for a local or bundled
    source, by a tokenize-only pass; (None, False) for a hub dataset.

    Needed for an exact free-disk check and an ETA when no max_tokens is given. The caller
    keeps a fresh count in the cache folder (once the run is sure to start), so a resumed run
    does not tokenize everything twice more.
    """
    if cfg.text.dataset != "bundled" and not Path(cfg.text.dataset).expanduser().exists():
        return None, False  # a hub dataset: counting means downloading it
    saved = Path(cfg.out) / COUNT_FILE
    if saved.is_file():
        return int(json.loads(saved.read_text())["n_contexts"]), False
    logger.info("counting the dataset's contexts first (pass --max-tokens to skip this)")
    n = 0
    for _ in progress_bar(
        iter_contexts(cfg.text, tokenizer), desc="counting contexts", unit="ctx", leave=False
    ):
        n += 1
    return n, True


# -- the run --------------------------------------------------------------------------------


def cache_activations(
    cfg: CacheConfig, model: Any = None, rank: int | None = None, world_size: int | None = None
) -> CacheResult:
    """Cache cfg.hooks for cfg.text into cfg.out (resuming a killed run, rewriting damaged
    shards of a finished one). See the module doc.

    `model` may be passed to reuse an already loaded TransformerBridge; rank / world_size
    default to the torchrun environment.
    """
    from activations.hooks import check_hook_names, hook_widths

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
    run = Run(
        cfg,
        model,
        names,
        {n: hook_dir(out, n) for n in names},
        widths,
        shard_tokens,
        rank,
        world,
        _plan(cfg),
    )
    with hold_folder(out, "sae cache", name=lock_name(rank)):
        result = _cache(run, fingerprint_of(cfg, shard_tokens, world))
    return result._replace(seconds=time.perf_counter() - start_time)


def _cache(run: Run, fingerprint: dict[str, Any]) -> CacheResult:
    cfg, rank, world, names, folders = run.cfg, run.rank, run.world, run.names, run.folders
    out = Path(cfg.out)
    replacing = check_out(out, fingerprint, cfg.overwrite)
    base = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": cfg.model,
        "dataset": to_dict(cfg.text),
        "dtype": cfg.dtype,
        "context_size": cfg.text.context_size,
        "drop_bos": cfg.drop_bos,
        "shard_tokens": run.shard_tokens,
        "world_size": world,
    }
    bases = {n: {**base, "hook_name": n, "d_in": run.widths[n]} for n in names}
    writer = ShardWriter(DTYPES[cfg.dtype], {"format": FORMAT})
    try:
        if replacing is None and all((folders[n] / part_name(rank)).is_file() for n in names):
            return _check_finished(run, writer, bases)
        return _write(run, writer, fingerprint, replacing, bases)
    finally:
        writer.close()


def _check_finished(run: Run, writer: ShardWriter, bases: dict[str, Any]) -> CacheResult:
    """A rank that is done: check its shards, rewrite the damaged ones, merge manifests."""
    parts = {n: json.loads((run.folders[n] / part_name(run.rank)).read_text()) for n in run.names}
    damaged = find_damage(run, parts, run.cfg.verify)
    repaired: tuple[str, ...] = ()
    new_rows = 0
    record = run.cfg.verify and any("sha256" not in e for p in parts.values() for e in p["shards"])
    if damaged or record:
        digests = known_digests(run, parts, run.cfg.verify)
        if damaged:
            repaired, new_rows = repair(run, writer, damaged)
            writer.close()  # every rewritten shard is on disk before the manifests list it
            for path, digest in writer.digests.items():
                if path in digests and digests[path]["sha256"] != digest["sha256"]:
                    logger.warning(
                        "%s came out different from when it was first written (a model that "
                        "is not deterministic on this device?); its new checksum is recorded",
                        path,
                    )
            digests.update(writer.digests)
        for n in run.names:
            write_part_manifest(run.folders[n], run.rank, len(parts[n]["shards"]), digests)
    else:
        logger.info("rank %d of %s is already complete and sound", run.rank, run.cfg.out)
    for n in run.names:
        merge_manifest(run.folders[n], bases[n], run.world)
    held = int(parts[run.names[0]]["n_tokens"])
    return CacheResult(Path(run.cfg.out), run.folders, held, new_rows, 0.0, repaired)


def _write(
    run: Run,
    writer: ShardWriter,
    fingerprint: dict[str, Any],
    replacing: dict[str, Any] | None,
    bases: dict[str, Any],
) -> CacheResult:
    """A new or interrupted rank: check the disk, then compute every shard not yet written."""
    cfg, rank, world, names, folders, plan = (
        run.cfg,
        run.rank,
        run.world,
        run.names,
        run.folders,
        run.plan,
    )
    out = Path(cfg.out)
    done_shards = 0
    damaged: dict[int, dict[str, str]] = {}
    if replacing is None and all(f.is_dir() for f in folders.values()):
        done_shards = min(complete_shards(folders[n], rank) for n in names)
        # Shards an interrupted run wrote: present means renamed whole, but a disk can still
        # lose or cut them afterwards; their headers say the size each must have.
        for i in range(done_shards):
            for n in names:
                problem = shard_problem(folders[n] / shard_name(rank, i))
                if problem is not None:
                    damaged.setdefault(i, {})[n] = problem
    done_rows = done_shards * run.shard_tokens
    n_contexts, counted = (
        (plan.max_contexts, False)
        if plan.max_contexts is not None
        else _count_contexts(cfg, run.model.tokenizer)
    )
    total = None if n_contexts is None else _rank_rows(plan, n_contexts, rank, world)
    itemsize = DTYPES[cfg.dtype].itemsize
    bytes_per_row = sum(w * itemsize + META_BYTES_PER_ROW for w in run.widths.values())
    if total is not None:
        rows = max(total - done_rows, 0) + len(damaged) * run.shard_tokens
        reclaimed = 0
        if replacing is not None:
            reclaimed = sum(folder_bytes(hook_dir(out, h)) for h in replacing.get("hooks", []))
        needed = max(rows * bytes_per_row - reclaimed, 0)
        check_free_disk(out, needed, what=f"the cache in {out}")
    else:
        logger.warning("dataset size unknown: free disk is checked before each shard only")

    start_out(out, fingerprint, replacing)
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    if counted:
        atomic_write_json(out / COUNT_FILE, {"n_contexts": n_contexts})
    if done_rows:
        logger.info("resuming after %d complete shard(s): %d rows per hook", done_shards, done_rows)

    repaired: tuple[str, ...] = ()
    new_rows = 0
    if damaged:
        repaired, new_rows = repair(run, writer, damaged)
    bar = progress_bar(total=total, initial=done_rows, unit="tok", unit_scale=True, desc="caching")
    try:
        n_shards, rows = compute_shards(run, writer, done_shards, bar=bar)
        new_rows += rows
    finally:
        bar.close()
    writer.close()

    held = 0
    merged = False
    for n in names:
        held = write_part_manifest(folders[n], rank, n_shards, writer.digests)["n_tokens"]
        merged = merge_manifest(folders[n], bases[n], world)
    if world > 1 and not merged:
        logger.info("rank %d done; the last rank to finish writes the merged manifest", rank)
    logger.info("cached %d tokens x %d hook(s) into %s", held, len(names), out)
    return CacheResult(out, folders, held, new_rows, 0.0, repaired)
