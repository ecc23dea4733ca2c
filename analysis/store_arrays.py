"""The array side of the feature store (analysis/store.py): one directory of `.npy` files per
analysis generation, written once and memory-mapped on read.

    arrays-<UTC time>-<id>/<field>.npy   every `FeatureArrays.ARRAY_FIELDS` array
    arrays-<UTC time>-<id>/vocab.json    display string of every token id

A generation is written whole under a temporary name and renamed into place (`atomic_dir`),
so the SQLite transaction that points readers at it never points at a partial directory.
Standard library and numpy only, like the rest of the store.
"""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import numpy as np

from analysis.store_records import Example, FeatureArrays, token_text
from sae.atomic import atomic_dir
from sae.errors import UserError

T = TypeVar("T")


class GenerationArrays:
    """The memory-mapped arrays of one analysis generation."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vocab: list[str] = json.loads((root / "vocab.json").read_text())
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        arr = self._cache.get(name)
        if arr is None:
            arr = np.load(self.root / f"{name}.npy", mmap_mode="r")
            self._cache[name] = arr
        return arr

    def example_count(self, kind: str, feature_id: int) -> int:
        """The number of filled `top` or quantile (`q`) example slots of a feature."""
        return int((self[f"{kind}_sequence"][feature_id] >= 0).sum())

    def examples(
        self, kind: str, feature_id: int, context_before: int, offset: int, limit: int
    ) -> list[Example]:
        """A page of the feature's `top` or quantile (`q`) examples, empty slots skipped."""
        seq = self[f"{kind}_sequence"][feature_id]
        valid = np.flatnonzero(seq >= 0)[offset : offset + limit]
        ids = np.asarray(self[f"{kind}_token_ids"][feature_id, valid])
        acts = np.asarray(self[f"{kind}_acts"][feature_id, valid])
        pos = np.asarray(self[f"{kind}_position"][feature_id, valid])
        buckets = np.asarray(self["q_bucket"][feature_id, valid]) if kind == "q" else None
        out = []
        for j, slot in enumerate(valid):
            keep = ids[j] >= 0
            left_pad = int((~keep[:context_before]).sum())
            tok_ids = ids[j][keep].tolist()
            out.append(
                Example(
                    tokens=[token_text(self.vocab, t) for t in tok_ids],
                    token_ids=tok_ids,
                    acts=acts[j][keep].astype(float).tolist(),
                    max_index=context_before - left_pad,
                    max_act=float(acts[j][context_before]),
                    sequence=int(seq[slot]),
                    position=int(pos[j]),
                    quantile=None if buckets is None else int(buckets[j]),
                )
            )
        return out


class MappedGenerations:
    """The open memory maps of a store's current generation, shared by its threads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._open: dict[str, GenerationArrays] = {}

    def read(
        self,
        arrays_dir: str | None,
        fn: Callable[[GenerationArrays], T],
        current: Callable[[], str | None],
    ) -> T:
        """Run fn on the arrays of `arrays_dir`; if a concurrent re-analysis removed that
        directory meanwhile, retry once on the directory `current()` names now."""
        for attempt in range(2):
            if arrays_dir is None:
                raise UserError(f"the feature store at {self.root} holds no analysis yet")
            try:
                with self._lock:
                    arrays = self._open.get(arrays_dir)
                    if arrays is None:
                        arrays = GenerationArrays(self.root / arrays_dir)
                        # Keep only the current generation's memory maps.
                        self._open = {arrays_dir: arrays}
                return fn(arrays)
            except FileNotFoundError:
                if attempt:
                    raise
                arrays_dir = current()
        raise AssertionError("unreachable")

    def clear(self) -> None:
        with self._lock:
            self._open.clear()


def write_generation(root: Path, arrays: FeatureArrays) -> str:
    """Write `arrays` as a new generation directory under `root`; returns its name."""
    name = f"arrays-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    with atomic_dir(root / name) as tmp:
        for field_name in arrays.ARRAY_FIELDS:
            np.save(tmp / f"{field_name}.npy", np.ascontiguousarray(getattr(arrays, field_name)))
        (tmp / "vocab.json").write_text(json.dumps(arrays.vocab))
    return name


def remove_generations(root: Path, keep: set[str | None]) -> None:
    """Delete every generation directory under `root` whose name is not in `keep`."""
    for path in root.glob("arrays-*"):
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)
