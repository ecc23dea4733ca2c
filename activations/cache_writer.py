"""The activation-cache writer: buffers rows into shards, writes them, merges the manifests.

Rows are buffered in float32 until a shard is full (`ShardBuffers`), so its statistics are
exact; full shards are written on a background thread (`ShardWriter`) under a temporary name,
then renamed, and hashed as they are written. Each rank lists its shards (rows, size, SHA-256)
in a part manifest, and the last rank to finish merges the parts into manifest.json. The
files are laid out as activations/cache_format.py describes.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from activations.cache_format import (
    MANIFEST,
    META_COLUMNS,
    file_sha256,
    part_name,
    shard_name,
    write_safetensors,
)
from sae.atomic import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)


class ShardWriter:
    """Writes shards on a background thread, so disk time overlaps the next forward pass."""

    def __init__(self, dtype: torch.dtype, metadata: dict[str, str]) -> None:
        self.dtype = dtype
        self.metadata = metadata
        self.queue: queue.Queue[tuple[Path, dict[str, Tensor]] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.digests: dict[Path, dict[str, Any]] = {}
        """{"bytes", "sha256"} of every shard written, by path."""
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def submit(self, path: Path, rows: dict[str, Tensor]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((path, rows))

    def close(self) -> None:
        """Wait for every submitted shard; raise the first write error, if any."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as e:
                self.error = e

    def _write(self, path: Path, rows: dict[str, Tensor]) -> None:
        acts = rows["activations"]
        sum_D, sq_norm = shard_statistics(acts)
        tensors = {
            "activations": acts.to(self.dtype),
            **{name: rows[name] for name in META_COLUMNS},
            # Statistics of the float32 activations, per shard, so a resumed run still sums
            # over every row exactly once.
            "stat_sum": sum_D,
            "stat_sq_norm": sq_norm.reshape(1),
        }
        needed = sum(t.numel() * t.element_size() for t in tensors.values()) + 4096
        with atomic_path(path, expected_bytes=needed) as tmp:
            digest = write_safetensors(tmp, tensors, self.metadata)
        self.digests[path] = digest


def shard_statistics(acts: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """(sum over rows [D], sum of squared row norms) in float64 accumulators.

    Chunks are summed in float32 and accumulated in float64: as exact as statistics need, and
    without the full float64 copy of the shard (measured 20x faster than `.double()` first).
    """
    sum_D = torch.zeros(acts.shape[1], dtype=torch.float64)
    sq = torch.zeros((), dtype=torch.float64)
    for i in range(0, acts.shape[0], chunk):
        x = acts[i : i + chunk]
        sum_D += x.sum(0).double()
        sq += torch.einsum("nd,nd->n", x, x).double().sum()
    return sum_D, sq


class ShardBuffers:
    """Rows of every hook waiting for a full shard (float32, so statistics are exact); full
    shards go to the writer under consecutive indices (only those `keep(index, hook)` picks:
    a repair computes every hook but rewrites only the damaged files)."""

    def __init__(
        self,
        folders: dict[str, Path],
        widths: dict[str, int],
        shard_tokens: int,
        rank: int,
        first_index: int,
        writer: ShardWriter,
        keep: Callable[[int, str], bool] | None = None,
    ) -> None:
        self.folders, self.widths, self.size = folders, widths, shard_tokens
        self.rank, self.next_index, self.writer = rank, first_index, writer
        self.keep = keep
        self._new()

    def _new(self) -> None:
        self.acts = {n: torch.empty(self.size, w) for n, w in self.widths.items()}
        self.meta = {
            name: torch.empty(self.size, dtype=dtype) for name, dtype in META_COLUMNS.items()
        }
        self.fill = 0

    def add(self, acts: dict[str, Tensor], meta: dict[str, Tensor]) -> None:
        """Append rows (same count for every hook), writing each shard as it fills."""
        n_rows, taken = len(meta["sequence"]), 0
        while taken < n_rows:
            n = min(self.size - self.fill, n_rows - taken)
            dst, src = slice(self.fill, self.fill + n), slice(taken, taken + n)
            for name, a in acts.items():
                self.acts[name][dst] = a[src]
            for key, m in meta.items():
                self.meta[key][dst] = m[src]
            self.fill += n
            taken += n
            if self.fill == self.size:
                self.flush()

    def flush(self) -> None:
        """Write the rows held (a full shard, or the last, shorter one)."""
        if not self.fill:
            return
        k = self.fill
        for name, a in self.acts.items():
            if self.keep is not None and not self.keep(self.next_index, name):
                continue
            rows = {"activations": a[:k], **{key: m[:k] for key, m in self.meta.items()}}
            self.writer.submit(self.folders[name] / shard_name(self.rank, self.next_index), rows)
        self.next_index += 1
        self._new()


def write_part_manifest(
    folder: Path, rank: int, n_shards: int, digests: dict[Path, dict[str, Any]]
) -> dict[str, Any]:
    """Rank `rank`'s shard list and statistic sums, read back from its shard files.

    `digests` holds the size and checksum of the shards written by this process (or known
    from an earlier part manifest); shards an interrupted earlier process wrote are hashed here.
    """
    from safetensors import safe_open

    shards, total, stat_sum, sq = [], 0, None, 0.0
    unknown = [i for i in range(n_shards) if folder / shard_name(rank, i) not in digests]
    if unknown:
        logger.info("hashing %d shard(s) written before this run resumed", len(unknown))
    for i in range(n_shards):
        path = folder / shard_name(rank, i)
        with safe_open(str(path), "pt") as f:
            n = f.get_slice("token_ids").get_shape()[0]
            s = f.get_tensor("stat_sum")
            sq += float(f.get_tensor("stat_sq_norm")[0])
        stat_sum = s if stat_sum is None else stat_sum + s
        digest = digests.get(path) or {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        shards.append({"file": path.name, "n_rows": n, **digest})
        total += n
    part = {
        "rank": rank,
        "n_tokens": total,
        "shards": shards,
        "stat_sum": [] if stat_sum is None else stat_sum.tolist(),
        "stat_sq_norm": sq,
    }
    atomic_write_json(folder / part_name(rank), part)
    return part


def merge_manifest(folder: Path, base: dict[str, Any], world_size: int) -> bool:
    """Write manifest.json from all ranks' parts if every rank is done; True if written."""
    paths = [folder / part_name(r) for r in range(world_size)]
    if not all(p.is_file() for p in paths):
        return False
    parts = [json.loads(p.read_text()) for p in paths]
    n = sum(p["n_tokens"] for p in parts)
    sums = [torch.tensor(p["stat_sum"], dtype=torch.float64) for p in parts if p["n_tokens"]]
    mean = (torch.stack(sums).sum(0) / max(n, 1)).tolist() if sums else []
    manifest = {
        **base,
        "n_tokens": n,
        "shards": [s for p in parts for s in p["shards"]],
        "mean": mean,
        "mean_squared_norm": sum(p["stat_sq_norm"] for p in parts) / max(n, 1),
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return True
