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
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from activations.cache_format import (
    CONFIG_FILE,
    COUNT_FILE,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    META_BYTES_PER_ROW,
    StorageDtype,
    file_sha256,
    hook_dir,
    part_name,
    shard_name,
    shard_problem,
    verify_shard,
)
from activations.cache_writer import (
    ShardBuffers,
    ShardWriter,
    merge_manifest,
    write_part_manifest,
)
from activations.prefetch import in_background
from activations.text import TextConfig, check_source, context_batches, iter_contexts
from sae.atomic import atomic_write_json, check_free_disk
from sae.dataclass_cli import to_dict
from sae.devices import DTYPES, resolve_device
from sae.errors import UserError
from sae.locks import LOCK_NAME, hold_folder
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


# -- the folder ----------------------------------------------------------------------------


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


def options_from_fingerprint(fingerprint: dict[str, Any], out: Path) -> dict[str, Any]:
    """CacheConfig options that redo the run a cache_config.json describes (in folder `out`).

    The text batch size is not part of the fingerprint (it does not change the rows); it is
    taken from a hook's manifest where there is one, so a repair batches contexts as the
    first run did.
    """
    options = {k: v for k, v in fingerprint.items() if k not in ("format", "version", "world_size")}
    for hook in fingerprint.get("hooks", []):
        manifest = hook_dir(out, hook) / MANIFEST
        if manifest.is_file():
            batch_size = json.loads(manifest.read_text()).get("dataset", {}).get("batch_size")
            if batch_size is not None:
                options["text"] = {**options.get("text", {}), "batch_size": batch_size}
            break
    return {**options, "out": str(out)}


def _lock_name(rank: int) -> str:
    return LOCK_NAME if rank == 0 else f"{LOCK_NAME}.rank{rank:02d}"


def _check_out(out: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """Refuse a folder holding anything but this same run; writes nothing. Returns the config
    of a different run that `overwrite` will replace, None if there is none."""
    config_path = out / CONFIG_FILE
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        if old == fingerprint:
            return None
        if not overwrite:
            changed = sorted(
                k for k in fingerprint.keys() | old.keys() if old.get(k) != fingerprint.get(k)
            )
            raise UserError(
                f"{out} holds a cache of a different run (differs in {', '.join(changed)}); "
                "pick another --out or pass --overwrite"
            )
        return dict(old)
    if out.exists():
        # Another rank of the same torchrun job may be a moment ahead: its hook folders, lock
        # and temporary files are expected here, anything else is someone else's data.
        ours = {*fingerprint["hooks"], COUNT_FILE}
        foreign = [
            p.name
            for p in out.iterdir()
            if p.name not in ours
            and not p.name.startswith(LOCK_NAME)
            and not (p.name.startswith(".") and p.name.endswith(".tmp"))
        ]
        if foreign:
            raise UserError(
                f"{out} is not empty and is not an activation cache (holds {foreign[0]}); "
                "pick another --out"
            )
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _start_out(out: Path, fingerprint: dict[str, Any], replacing: dict[str, Any] | None) -> None:
    """Clear the run being replaced, then record this run's config (the resume key)."""
    if replacing is not None:
        for name in replacing.get("hooks", []):
            shutil.rmtree(hook_dir(out, name), ignore_errors=True)
        (out / COUNT_FILE).unlink(missing_ok=True)
    if not (out / CONFIG_FILE).is_file() or replacing is not None:
        atomic_write_json(out / CONFIG_FILE, fingerprint)


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


# -- computing shards -----------------------------------------------------------------------


class _Run(NamedTuple):
    """What every pass over the text of one caching run shares."""

    cfg: CacheConfig
    model: Any
    names: list[str]
    folders: dict[str, Path]
    widths: dict[str, int]
    shard_tokens: int
    rank: int
    world: int
    plan: _Plan


def _compute_shards(
    run: _Run,
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


def _find_damage(
    run: _Run, parts: dict[str, dict[str, Any]], verify: bool
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


def _known_digests(run: _Run, parts: dict[str, dict[str, Any]], verify: bool) -> dict[Path, Any]:
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


def _repair(
    run: _Run, writer: ShardWriter, damaged: dict[int, dict[str, str]]
) -> tuple[tuple[str, ...], int]:
    """Compute the damaged shards again and rewrite exactly those files."""
    names = tuple(
        f"{hook}/{shard_name(run.rank, i)}: {problem}"
        for i in sorted(damaged)
        for hook, problem in damaged[i].items()
    )
    logger.warning("rewriting %d damaged shard(s): %s", len(names), "; ".join(names))
    rows = 0
    for first, last in _ranges(sorted(damaged)):
        _, n = _compute_shards(
            run, writer, first, last, keep=lambda i, hook: hook in damaged.get(i, {})
        )
        rows += n
    return names, rows


def _ranges(indices: list[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7] -> [(1, 3), (7, 7)]: consecutive shards are computed in one pass."""
    out: list[tuple[int, int]] = []
    for i in indices:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


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
    run = _Run(
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
    with hold_folder(out, "sae cache", name=_lock_name(rank)):
        result = _cache(run, _fingerprint(cfg, shard_tokens, world))
    return result._replace(seconds=time.perf_counter() - start_time)


def _cache(run: _Run, fingerprint: dict[str, Any]) -> CacheResult:
    cfg, rank, world, names, folders = run.cfg, run.rank, run.world, run.names, run.folders
    out = Path(cfg.out)
    replacing = _check_out(out, fingerprint, cfg.overwrite)
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


def _check_finished(run: _Run, writer: ShardWriter, bases: dict[str, Any]) -> CacheResult:
    """A rank that is done: check its shards, rewrite the damaged ones, merge manifests."""
    parts = {n: json.loads((run.folders[n] / part_name(run.rank)).read_text()) for n in run.names}
    damaged = _find_damage(run, parts, run.cfg.verify)
    repaired: tuple[str, ...] = ()
    new_rows = 0
    record = run.cfg.verify and any("sha256" not in e for p in parts.values() for e in p["shards"])
    if damaged or record:
        digests = _known_digests(run, parts, run.cfg.verify)
        if damaged:
            repaired, new_rows = _repair(run, writer, damaged)
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
    run: _Run,
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
        done_shards = min(_complete_shards(folders[n], rank) for n in names)
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
            reclaimed = sum(_folder_bytes(hook_dir(out, h)) for h in replacing.get("hooks", []))
        needed = max(rows * bytes_per_row - reclaimed, 0)
        check_free_disk(out, needed, what=f"the cache in {out}")
    else:
        logger.warning("dataset size unknown: free disk is checked before each shard only")

    _start_out(out, fingerprint, replacing)
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    if counted:
        atomic_write_json(out / COUNT_FILE, {"n_contexts": n_contexts})
    if done_rows:
        logger.info("resuming after %d complete shard(s): %d rows per hook", done_shards, done_rows)

    repaired: tuple[str, ...] = ()
    new_rows = 0
    if damaged:
        repaired, new_rows = _repair(run, writer, damaged)
    bar = progress_bar(total=total, initial=done_rows, unit="tok", unit_scale=True, desc="caching")
    try:
        n_shards, rows = _compute_shards(run, writer, done_shards, bar=bar)
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
