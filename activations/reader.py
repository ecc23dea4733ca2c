"""Reading an activation cache: the reader core and the shuffled training reader.

`CacheShards` is the one reader core: it opens one cached hook (manifest, a size check of every
shard, row-count check, a memory map of every shard's activations, a shard's metadata columns
on request). Both readers
are built on it: the shuffled `CachedActivations` below (a `ResumableSource` for the trainer,
activations/source.py) and the ordered per-context `cached_activations` that feature analysis
reads (activations/contexts.py). The files are laid out as activations/cache_format.py says.

The shuffled order.

Why not read shards in order: consecutive rows are consecutive tokens of one context, and
SAELens's cache was found not to be shuffled at all. Why not a per-row global permutation:
random 2-8 KiB reads are slow on disk. So each epoch is a two-level shuffle:

1. every shard is cut into chunks of `chunk_rows` consecutive rows; the chunks of the whole
   cache are permuted (seed, epoch);
2. consecutive permuted chunks fill a mixing buffer of about `buffer_bytes`; its rows are
   permuted (seed, epoch, rank, buffer) and cut into batches.

A batch therefore mixes rows from chunks spread over all shards, reads stay sequential
(`chunk_rows` rows at a time from a memory map), every row is yielded exactly once per epoch,
and the order is a pure function of (seed, epoch): `state_dict()` is just (epoch, position)
and `load_state_dict()` resumes with exactly the same subsequent batches.

Pairs of hooks (a transcoder's input and target): with `target_hook`, every batch row is the
input hook's activation followed by the target hook's of the same token, [B, d_in + d_out].
Both hooks must come from one `sae cache` pass (the same rows in the same shards), which
`paired_shards` checks; the order is the single hook's, so the two sides never drift apart.

With `world_size > 1` (DDP) rank r takes every world_size-th permuted chunk, so ranks read
disjoint rows; every rank yields the same number of full batches per epoch (the few rows
beyond the smallest rank's share are left out that epoch) so their steps stay in lock-step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from activations.cache_format import (
    CONFIG_FILE,
    hook_dir,
    memmap_activations,
    open_manifest,
    read_cache_config,
    read_meta_columns,
    repair_command,
    shard_problem,
)
from activations.prefetch import in_background
from sae.devices import DTYPES
from sae.errors import UserError


class CacheShards:
    """One cached hook opened for reading: its manifest and a memory map of every shard's
    activations (`activations[i]`, [n_rows of shard i, d_in] in the stored dtype, no copy).

    `path` is a cache root plus `hook_name`, or a hook folder (see `open_manifest`). A UserError
    naming the shard and the command that repairs it if a shard is missing or has the wrong
    size, or if the shards do not hold the rows the manifest counts.
    """

    def __init__(self, path: str | Path, hook_name: str | None = None) -> None:
        self.folder, self.manifest = open_manifest(path, hook_name)
        self.hook_name: str = self.manifest["hook_name"]
        self.d_in: int = int(self.manifest["d_in"])
        self.dtype: torch.dtype = DTYPES[self.manifest["dtype"]]
        self.files = [self.folder / s["file"] for s in self.manifest["shards"]]
        self._check_sizes()
        self.activations = [memmap_activations(f) for f in self.files]
        self.n_rows = sum(len(t) for t in self.activations)
        if self.n_rows != self.manifest["n_tokens"]:
            raise UserError(
                f"{self.folder}: shards hold {self.n_rows} rows, manifest says {self.manifest['n_tokens']}"
            )

    def _check_sizes(self) -> None:
        damaged = [
            (f.name, problem)
            for f, entry in zip(self.files, self.manifest["shards"], strict=True)
            if (problem := shard_problem(f, entry)) is not None
        ]
        if not damaged:
            return
        name, problem = damaged[0]
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        config = read_cache_config(self.folder)
        fix = (
            f"repair it with `{repair_command(self.folder.parent, config.get('world_size', 1))}`"
            if config is not None
            else "write it again with the `sae cache` command that made it"
        )
        raise UserError(
            f"activation cache {self.folder}: shard {name} is damaged ({problem}){more}; {fix}"
        )

    def __len__(self) -> int:
        """Number of shards."""
        return len(self.files)

    def meta_columns(self, shard: int) -> dict[str, Tensor]:
        """token_ids, sequence and position of every row of shard `shard` (in memory)."""
        return read_meta_columns(self.files[shard])


def paired_shards(
    path: str | Path, hook_name: str | None, target_hook: str
) -> tuple[CacheShards, CacheShards]:
    """The input and target hooks of a transcoder, opened and checked to hold the same rows:
    a UserError naming the missing hook, or the first shard whose rows differ, with the
    command that caches both in one pass."""
    inputs = CacheShards(path, hook_name)
    root = inputs.folder.parent
    config = read_cache_config(inputs.folder) or {}
    cached = list(config.get("hooks", [inputs.hook_name]))
    both = " ".join(dict.fromkeys([inputs.hook_name, target_hook]))
    fix = (f"cache both hooks in one pass: sae cache --config {root / CONFIG_FILE} "
           f"--hooks {both} --out NEW_CACHE")  # fmt: skip
    if target_hook == inputs.hook_name:
        raise UserError(f"--transcoder.target {target_hook} is the input hook itself; a "
                        "transcoder reconstructs another hook (e.g. blocks.0.hook_mlp_out)")  # fmt: skip
    if not hook_dir(root, target_hook).is_dir():
        raise UserError(f"activation cache {root} has no target hook {target_hook!r} (it caches "
                        f"{', '.join(cached)}); {fix}")  # fmt: skip
    targets = CacheShards(root, target_hook)
    sizes = [len(t) for t in inputs.activations], [len(t) for t in targets.activations]
    bad = next((i for i, (a, b) in enumerate(zip(*sizes, strict=False)) if a != b), None)
    if bad is None and len(sizes[0]) != len(sizes[1]):
        bad = min(len(sizes[0]), len(sizes[1]))
    for i in [] if bad is not None else sorted({0, len(inputs) - 1}):
        a, b = inputs.meta_columns(i), targets.meta_columns(i)
        if not all(torch.equal(a[k], b[k]) for k in ("token_ids", "sequence")):
            bad = i
            break
    if bad is not None:
        raise UserError(f"activation cache {root}: hooks {inputs.hook_name} and {target_hook} "
                        f"hold different rows (from shard {bad} on); {fix}")  # fmt: skip
    return inputs, targets


class _Chunk(NamedTuple):
    shard: int
    start: int
    stop: int


class CachedActivations:
    """Shuffled batches [batch_size, d_in] of one cached hook, on `device`, for `epochs`.

    `rows=(lo, hi)` reads only rows lo..hi-1 of the cache in stored (manifest) order, e.g. all
    but a held-out tail (activations/contexts.py `cache_tail`).

    Iterating continues from the current position (a fresh reader starts at epoch 0, row 0);
    `state_dict()` after a batch says where the next one starts. `prefetch` batches are
    gathered and cast ahead on a background thread (0: all on the caller's thread, the plain
    reference path; both give the same batches).
    """

    def __init__(
        self,
        path: str | Path,
        hook_name: str | None = None,
        batch_size: int = 4096,
        device: str | torch.device = "cpu",
        seed: int = 0,
        epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
        buffer_bytes: int = 512 * 2**20,
        chunk_rows: int = 1024,
        drop_last: bool = False,
        prefetch: int = 4,
        rows: tuple[int, int] | None = None,
        target_hook: str | None = None,
    ) -> None:
        if batch_size < 1 or epochs < 1 or chunk_rows < 1:
            raise ValueError("batch_size, epochs and chunk_rows must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.targets: CacheShards | None = None
        """The target hook of a transcoder's pairs (None: one hook)."""
        if target_hook is not None:
            self.cache, self.targets = paired_shards(path, hook_name, target_hook)
        else:
            self.cache = CacheShards(path, hook_name)
        self.hook_name = self.cache.hook_name
        self.d_in = self.cache.d_in
        self.d_out: int | None = None if self.targets is None else self.targets.d_in
        """Width of the target rows that follow each input row (None: one hook)."""
        width = self.d_in + (self.d_out or 0)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.epochs = epochs
        self.rank = rank
        self.world_size = world_size
        self.dtype = dtype
        self.drop_last = drop_last or world_size > 1
        self.prefetch = prefetch
        self.shards = self.cache.activations
        self.buffer_rows = max(batch_size, buffer_bytes // (width * self.cache.dtype.itemsize))
        lo, hi = rows if rows is not None else (0, self.cache.n_rows)
        if not 0 <= lo < hi <= self.cache.n_rows:
            raise ValueError(f"rows {rows} outside the cache's {self.cache.n_rows} rows")
        self.chunks = []
        offset = 0
        for i, t in enumerate(self.shards):
            # Rows [lo, hi) of the shards in manifest order, cut into chunks within a shard.
            start, stop = max(lo - offset, 0), min(hi - offset, len(t))
            self.chunks += [
                _Chunk(i, a, min(a + chunk_rows, stop)) for a in range(start, stop, chunk_rows)
            ]
            offset += len(t)
        self.n_rows = hi - lo
        self.epoch = 0
        self.position = 0
        self._rows_per_epoch: int | None = None

    # -- the deterministic order -----------------------------------------------------------
    def _epoch_chunks(self, epoch: int, rank: int) -> list[_Chunk]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        return [self.chunks[i] for i in order[rank :: self.world_size]]

    def _groups(self, chunks: list[_Chunk]) -> list[list[_Chunk]]:
        """Consecutive chunks filling one mixing buffer each."""
        groups: list[list[_Chunk]] = []
        rows = 0
        for c in chunks:
            n = c.stop - c.start
            if groups and rows + n <= self.buffer_rows:
                groups[-1].append(c)
                rows += n
            else:
                groups.append([c])
                rows = n
        return groups

    def rows_per_epoch(self) -> int:
        """Rows this rank yields per epoch."""
        if self.world_size == 1:
            return self.n_rows
        if self._rows_per_epoch is None:
            self._rows_per_epoch = self._equal_share()
        return self._rows_per_epoch

    def _equal_share(self) -> int:
        # Equal full batches on every rank (DDP steps must match); the chunk split differs
        # per epoch, so take the smallest share over epochs and ranks.
        least = min(
            sum(c.stop - c.start for c in self._epoch_chunks(e, r))
            for e in range(self.epochs)
            for r in range(self.world_size)
        )
        return least // self.batch_size * self.batch_size

    @property
    def batches_per_epoch(self) -> int:
        rows = self.rows_per_epoch()
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def __len__(self) -> int:
        return self.epochs * self.batches_per_epoch

    @property
    def mean(self) -> Float[Tensor, " D"]:
        """Per-dimension mean of the cached activations (from the manifest)."""
        return torch.tensor(self.cache.manifest["mean"], dtype=torch.float32)

    @property
    def mean_squared_norm(self) -> float:
        """E ||x||^2 over the cache (for scaling inputs so that E ||x||^2 = d_in)."""
        return float(self.cache.manifest["mean_squared_norm"])

    # -- resume ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "n_rows": self.n_rows,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "n_rows", "rank", "world_size", "batch_size"):
            if state.get(key) != getattr(self, key):
                raise UserError(
                    f"reader state is for {key}={state.get(key)!r} but this reader has "
                    f"{getattr(self, key)!r}; resume with the same cache and settings"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    # -- iteration -------------------------------------------------------------------------
    def _load_group(self, group: list[_Chunk]) -> Tensor:
        parts = [self.shards[c.shard][c.start : c.stop] for c in group]
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.targets is None:
            return rows
        # Pairs: the target hook's rows of the same chunks beside the input's.
        ys = [self.targets.activations[c.shard][c.start : c.stop] for c in group]
        return torch.cat([rows, torch.cat(ys) if len(ys) > 1 else ys[0]], dim=1)

    def _pieces(self, epoch: int, start: int, limit: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's epoch order from row `start` to `limit`: (mixing buffer, row order)."""
        offset = 0
        for g, group in enumerate(self._groups(self._epoch_chunks(epoch, self.rank))):
            n = sum(c.stop - c.start for c in group)
            if offset + n <= start:
                offset += n
                continue  # skipped without reading: this is how a resume is cheap
            if offset >= limit:
                return
            perm = np.random.default_rng([self.seed, epoch, self.rank, g]).permutation(n)
            lo, hi = max(start - offset, 0), min(limit - offset, n)
            yield self._load_group(group), torch.from_numpy(perm[lo:hi])
            offset += n

    def _batches(self, epoch: int, position: int) -> Iterator[tuple[Tensor, int, int]]:
        """(batch in the output dtype, epoch, position after it) from (epoch, position) on.

        Pure: reads no reader state but its arguments, so it can run on a prefetch thread.
        """
        per_epoch = self.rows_per_epoch()
        limit = per_epoch // self.batch_size * self.batch_size if self.drop_last else per_epoch
        B = self.batch_size
        pin = self.device.type == "cuda"
        while epoch < self.epochs:
            pending: list[Tensor] = []
            held = 0
            for buffer, order in self._pieces(epoch, position, limit):
                i = 0
                while i < len(order):
                    take = min(B - held, len(order) - i)
                    pending.append(buffer.index_select(0, order[i : i + take]))
                    held, i = held + take, i + take
                    if held == B or (i == len(order) and position + held == limit):
                        batch = torch.cat(pending) if len(pending) > 1 else pending[0]
                        batch = batch.to(self.dtype)
                        position += held
                        pending, held = [], 0
                        yield (batch.pin_memory() if pin else batch), epoch, position
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[Float[Tensor, "B D"]]:
        batches = self._batches(self.epoch, self.position)
        if self.prefetch:
            batches = in_background(batches, self.prefetch)
        for batch, epoch, position in batches:
            self.epoch, self.position = epoch, position
            yield batch.to(self.device, non_blocking=True)
        self.epoch, self.position = self.epochs, 0
