"""The feature store: per-feature statistics, examples and labels of one dictionary.

Written by `sae analyze` (analysis/analyze.py), read by the HTTP service and by users.
It imports only numpy and the standard library, so the server can read it without a
language-model stack.

Layout, by default `<dictionary dir>/analysis/`:

    features.sqlite          SQLite in WAL mode: meta, per-feature statistics and logit
                             effects, user labels (kept across re-analysis), FTS5 index
    arrays-<id>/*.npy        large arrays, memory-mapped on read: example token windows and
                             per-token activations, histograms; vocab.json (token strings)

Re-analysis writes a fresh `arrays-<id>/` directory (atomically, under a temporary name),
then swaps the statistics and the pointer to the new arrays in ONE SQLite transaction, so a
reader sees either the old analysis or the new one, never a mix. Labels live in their own
table and are never touched by re-analysis. The previous arrays directory is kept one
generation longer so readers that looked up the old pointer can still open it.

Concurrency: any number of reader threads/processes and one writer at a time (WAL). Each
thread gets its own connection; a busy database is waited for (`busy_timeout`), not failed.

The records (`StoreMeta`, `FeatureRecord`, `Example`, `FeatureArrays`, ...) live in
analysis/store_records.py, the SQL schema/row encoding in analysis/store_schema.py, and the
array directories (writing, memory-mapping, reading examples) in analysis/store_arrays.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from analysis.store_arrays import (
    GenerationArrays,
    MappedGenerations,
    remove_generations,
    write_generation,
)
from analysis.store_records import (
    Example,
    FeatureArrays,
    FeatureRecord,
    FeatureSummary,
    Histogram,
    Label,
    StoreMeta,
    TokenEffect,
)
from analysis.store_schema import (
    SCHEMA,
    feature_rows,
    fts_match,
    reindex,
    select_labels,
    select_summaries,
)
from sae.errors import UserError

logger = logging.getLogger(__name__)

DB_NAME = "features.sqlite"
ANALYSIS_DIR = "analysis"
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

OrderBy = Literal["feature_id", "density", "max_act", "mean_act"]
ORDER_COLUMNS: tuple[str, ...] = ("feature_id", "density", "max_act", "mean_act")
T = TypeVar("T")


# -- the store -------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_store_dir(path: str | Path) -> Path:
    """A dictionary dir -> its `analysis/`; an analysis dir or its `features.sqlite` -> the dir."""
    path = Path(path).expanduser()
    if path.name == DB_NAME:
        return path.parent
    if (path / DB_NAME).exists():
        return path
    if (path / "cfg.json").is_file():
        return path / ANALYSIS_DIR
    return path


class FeatureStore:
    """Read and write one dictionary's feature store. Thread-safe; see the module docstring."""

    def __init__(self, root: Path, readonly: bool) -> None:
        self.root = root
        self.readonly = readonly
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._arrays = MappedGenerations(root)

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, readonly: bool = False) -> FeatureStore:
        """Open (and, unless readonly, create) the store for a dictionary dir or analysis dir."""
        root = resolve_store_dir(path)
        if readonly and not (root / DB_NAME).is_file():
            raise UserError(f"no feature store at {root}: run `sae analyze` on the dictionary")
        if not readonly:
            root.mkdir(parents=True, exist_ok=True)
        store = cls(root, readonly)
        if not readonly:
            # executescript manages its own transaction; every statement is idempotent.
            store._conn().executescript(SCHEMA)
            with store._write() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                    (json.dumps(SCHEMA_VERSION),),
                )
        return store

    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self.readonly:
                uri = f"file:{self.db_path}?mode=ro"
            else:
                uri = f"file:{self.db_path}?mode=rwc"
            conn = sqlite3.connect(
                uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False
            )
            conn.isolation_level = None  # explicit BEGIN/COMMIT below
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not self.readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._conns.clear()
        self._arrays.clear()
        self._local = threading.local()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query inside sees one snapshot of the database."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise UserError(f"the feature store at {self.root} was opened read-only")
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- reading -------------------------------------------------------------------------------
    @staticmethod
    def _meta_value(conn: sqlite3.Connection, key: str) -> Any:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def has_statistics(self) -> bool:
        """True once an analysis has been stored."""
        with self._read() as conn:
            return self._meta_value(conn, "store_meta") is not None

    def meta(self) -> StoreMeta:
        """What was analysed. UserError if the store holds no analysis yet."""
        with self._read() as conn:
            return self._require_meta(conn)

    def _require_meta(self, conn: sqlite3.Connection) -> StoreMeta:
        raw = self._meta_value(conn, "store_meta")
        if raw is None:
            raise UserError(f"the feature store at {self.root} holds no analysis yet")
        return StoreMeta(**raw)

    def _check_id(self, meta: StoreMeta, feature_id: int) -> None:
        if not 0 <= feature_id < meta.d_sae:
            raise UserError(f"feature_id {feature_id} out of range [0, {meta.d_sae})")

    def feature(self, feature_id: int) -> FeatureRecord:
        """Statistics, histogram, logit effects and labels of one feature."""
        feature_id = int(feature_id)
        with self._read() as conn:
            meta = self._require_meta(conn)
            self._check_id(meta, feature_id)
            row = conn.execute(
                "SELECT n_fires, density, mean_act, max_act, top_tokens, promoted, suppressed "
                "FROM features WHERE feature_id = ?",
                (feature_id,),
            ).fetchone()
            labels = select_labels(conn, feature_id)
            arrays_dir = self._meta_value(conn, "arrays_dir")
        counts = self._with_arrays(arrays_dir, lambda a: a["hist_counts"][feature_id].tolist())
        n_fires, density, mean_act, max_act, top_tokens, promoted, suppressed = row
        return FeatureRecord(
            feature_id=feature_id,
            n_fires=int(n_fires),
            density=float(density),
            mean_act=float(mean_act),
            max_act=float(max_act),
            top_tokens=json.loads(top_tokens),
            histogram=Histogram(edges=list(meta.histogram_edges), counts=counts),
            promoted=[TokenEffect(t, int(i), float(v)) for t, i, v in json.loads(promoted)],
            suppressed=[TokenEffect(t, int(i), float(v)) for t, i, v in json.loads(suppressed)],
            labels=labels,
        )

    def top_examples(self, feature_id: int, offset: int = 0, limit: int = 20) -> list[Example]:
        """The feature's strongest activations, strongest first (ties: earliest token first)."""
        return self._examples(feature_id, "top", offset, limit)

    def example_count(self, feature_id: int, kind: Literal["top", "q"] = "top") -> int:
        """How many top (or quantile) examples the feature has: a page's total."""
        with self._read() as conn:
            self._check_id(self._require_meta(conn), int(feature_id))
            arrays_dir = self._meta_value(conn, "arrays_dir")
        return self._with_arrays(arrays_dir, lambda a: a.example_count(kind, int(feature_id)))

    def quantile_examples(
        self, feature_id: int, offset: int = 0, limit: int = 100
    ) -> list[Example]:
        """A uniform sample of the feature's activations, sorted by quantile bucket
        (weakest first) and by activation inside a bucket, as auto-interpretation uses."""
        return self._examples(feature_id, "q", offset, limit)

    def _examples(self, feature_id: int, kind: str, offset: int, limit: int) -> list[Example]:
        feature_id = int(feature_id)
        if offset < 0 or limit < 0:
            raise UserError("offset and limit must be non-negative")
        with self._read() as conn:
            meta = self._require_meta(conn)
            self._check_id(meta, feature_id)
            arrays_dir = self._meta_value(conn, "arrays_dir")
        return self._with_arrays(
            arrays_dir,
            lambda a: a.examples(kind, feature_id, meta.context_before, offset, limit),
        )

    def vocab(self) -> list[str]:
        """Display strings of every token id of the analysed model."""
        with self._read() as conn:
            self._require_meta(conn)
            arrays_dir = self._meta_value(conn, "arrays_dir")
        return self._with_arrays(arrays_dir, lambda a: a.vocab)

    def features(
        self,
        offset: int = 0,
        limit: int = 50,
        order_by: OrderBy = "feature_id",
        descending: bool = False,
    ) -> list[FeatureSummary]:
        """A page of the feature list."""
        if order_by not in ORDER_COLUMNS:
            raise UserError(f"order_by must be one of {', '.join(ORDER_COLUMNS)}, not {order_by!r}")
        if offset < 0 or limit < 0:
            raise UserError("offset and limit must be non-negative")
        direction = "DESC" if descending else "ASC"
        with self._read() as conn:
            self._require_meta(conn)
            rows = conn.execute(
                f"SELECT feature_id FROM features ORDER BY {order_by} {direction}, feature_id "
                "LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
            return select_summaries(conn, [r[0] for r in rows])

    def search(self, query: str, limit: int = 20, offset: int = 0) -> list[FeatureSummary]:
        """Full-text search (FTS5, every word must match, prefix match on the last) over
        labels, top-activating tokens and promoted/suppressed tokens; best match first."""
        match = fts_match(query)
        if match is None:
            return []
        with self._read() as conn:
            self._require_meta(conn)
            rows = conn.execute(
                "SELECT rowid FROM feature_fts WHERE feature_fts MATCH ? "
                "ORDER BY bm25(feature_fts, 4.0, 1.0, 1.0), rowid LIMIT ? OFFSET ?",
                (match, limit, offset),
            ).fetchall()
            return select_summaries(conn, [r[0] for r in rows])

    def search_total(self, query: str) -> int:
        """How many features `search(query)` finds over all its pages."""
        match = fts_match(query)
        with self._read() as conn:
            self._require_meta(conn)
            sql = "SELECT count(*) FROM feature_fts WHERE feature_fts MATCH ?"
            return 0 if match is None else int(conn.execute(sql, (match,)).fetchone()[0])

    def summaries(self, feature_ids: list[int]) -> list[FeatureSummary]:
        """The list-row summary of each feature in `feature_ids`, in that order."""
        with self._read() as conn:
            self._require_meta(conn)
            return select_summaries(conn, [int(i) for i in feature_ids])

    def labels(self, feature_id: int) -> list[Label]:
        """Labels of a feature, oldest first."""
        with self._read() as conn:
            return select_labels(conn, int(feature_id))

    def _with_arrays(self, arrays_dir: str | None, fn: Callable[[GenerationArrays], T]) -> T:
        """Run fn on the arrays of `arrays_dir` (the current ones if a re-analysis removed it)."""
        return self._arrays.read(arrays_dir, fn, self._current_arrays_dir)

    def _current_arrays_dir(self) -> str | None:
        with self._read() as conn:
            result: str | None = self._meta_value(conn, "arrays_dir")
            return result

    # -- writing -------------------------------------------------------------------------------
    def add_label(self, feature_id: int, text: str, author: str) -> Label:
        """Store a label for a feature (labels are never removed by re-analysis)."""
        text = text.strip()
        if not text:
            raise UserError("a label needs some text")
        if not author.strip():
            raise UserError("a label needs an author")
        feature_id = int(feature_id)
        created = _now()
        with self._write() as conn:
            meta_raw = self._meta_value(conn, "store_meta")
            if meta_raw is not None:
                self._check_id(StoreMeta(**meta_raw), feature_id)
            cur = conn.execute(
                "INSERT INTO labels (feature_id, text, author, created_at) VALUES (?, ?, ?, ?)",
                (feature_id, text, author.strip(), created),
            )
            label_id = cur.lastrowid
            reindex(conn, [feature_id])
        assert label_id is not None
        return Label(int(label_id), feature_id, text, author.strip(), created)

    def replace_statistics(self, arrays: FeatureArrays) -> StoreMeta:
        """Swap in a new analysis atomically; labels are kept. Returns the stored meta."""
        arrays.validate()
        name = write_generation(self.root, arrays)
        rows = list(feature_rows(arrays))
        try:
            with self._write() as conn:
                previous = self._meta_value(conn, "arrays_dir")
                generation = int(self._meta_value(conn, "generation") or 0) + 1
                meta = dataclasses.replace(arrays.meta, generation=generation)
                conn.execute("DELETE FROM features")
                conn.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                for key, value in (
                    ("store_meta", dataclasses.asdict(meta)),
                    ("arrays_dir", name),
                    ("previous_arrays_dir", previous),
                    ("generation", generation),
                ):
                    conn.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value))
                    )
                conn.execute("DELETE FROM feature_fts")
                reindex(conn, None)
        except BaseException:
            shutil.rmtree(self.root / name, ignore_errors=True)
            raise
        remove_generations(self.root, keep={name, previous})
        logger.info("feature store %s: generation %d (%s)", self.root, generation, name)
        return meta
