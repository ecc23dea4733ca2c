"""The SQLite side of the feature store (analysis/store.py): the schema, how one analysis
becomes rows of the `features` table, how the full-text index is rebuilt from those rows
and the labels, and how list rows and labels read back as records. Everything here runs
inside a transaction the store opened.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import numpy as np

from analysis.store_records import FeatureArrays, FeatureSummary, Label, token_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    feature_id INTEGER PRIMARY KEY,
    n_fires INTEGER NOT NULL,
    density REAL NOT NULL,
    mean_act REAL NOT NULL,
    max_act REAL NOT NULL,
    top_tokens TEXT NOT NULL,      -- JSON list of strings
    promoted TEXT NOT NULL,        -- JSON [[token, token_id, value], ...]
    suppressed TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS features_density ON features(density);
CREATE INDEX IF NOT EXISTS features_max_act ON features(max_act);
CREATE INDEX IF NOT EXISTS features_mean_act ON features(mean_act);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    feature_id INTEGER NOT NULL,
    text TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS labels_feature ON labels(feature_id, id);
CREATE VIRTUAL TABLE IF NOT EXISTS feature_fts USING fts5(labels, top_tokens, logits);
"""


def feature_rows(a: FeatureArrays) -> Iterator[tuple[Any, ...]]:
    """One `features` row per feature, in the column order of SCHEMA."""
    n_tokens = max(a.meta.n_tokens, 1)
    before = a.meta.context_before
    for f in range(a.meta.d_sae):
        fires = int(a.n_fires[f])
        seen: dict[str, None] = {}
        for slot in np.flatnonzero(a.top_sequence[f] >= 0):
            seen.setdefault(token_text(a.vocab, int(a.top_token_ids[f, slot, before])), None)
        effects = [
            json.dumps(
                [
                    [token_text(a.vocab, int(i)), int(i), float(v)]
                    for i, v in zip(ids, vals, strict=True)
                ]
            )
            for ids, vals in (
                (a.promoted_ids[f], a.promoted_values[f]),
                (a.suppressed_ids[f], a.suppressed_values[f]),
            )
        ]
        yield (
            f,
            fires,
            fires / n_tokens,
            float(a.sum_acts[f]) / fires if fires else 0.0,
            float(a.max_act[f]),
            json.dumps(list(seen)[:20]),
            *effects,
        )


def reindex(conn: sqlite3.Connection, feature_ids: list[int] | None) -> None:
    """Rebuild the FTS rows of some features (all if None) from features + labels."""
    where = ""
    if feature_ids is not None:
        id_list = ",".join(str(int(i)) for i in feature_ids)
        where = f"WHERE f.feature_id IN ({id_list})"
        conn.execute(f"DELETE FROM feature_fts WHERE rowid IN ({id_list})")
    rows = conn.execute(
        "SELECT f.feature_id, f.top_tokens, f.promoted, f.suppressed, "
        "(SELECT group_concat(text, ' ') FROM labels l WHERE l.feature_id = f.feature_id) "
        f"FROM features f {where}"
    ).fetchall()
    conn.executemany(
        "INSERT INTO feature_fts (rowid, labels, top_tokens, logits) VALUES (?, ?, ?, ?)",
        [
            (
                fid,
                labels or "",
                " ".join(json.loads(top)),
                " ".join(e[0] for e in json.loads(prom) + json.loads(supp)),
            )
            for fid, top, prom, supp, labels in rows
        ],
    )


def select_labels(conn: sqlite3.Connection, feature_id: int) -> list[Label]:
    """Labels of a feature, oldest first."""
    rows = conn.execute(
        "SELECT id, feature_id, text, author, created_at FROM labels "
        "WHERE feature_id = ? ORDER BY id",
        (feature_id,),
    ).fetchall()
    return [Label(*r) for r in rows]


def select_summaries(conn: sqlite3.Connection, ids: list[int]) -> list[FeatureSummary]:
    """The list-row summary of each feature in `ids` that exists, in that order."""
    out = []
    for fid in ids:
        row = conn.execute(
            "SELECT density, mean_act, max_act, top_tokens FROM features WHERE feature_id = ?",
            (fid,),
        ).fetchone()
        if row is None:
            continue
        label = conn.execute(
            "SELECT text FROM labels WHERE feature_id = ? ORDER BY id DESC LIMIT 1", (fid,)
        ).fetchone()
        out.append(
            FeatureSummary(
                feature_id=int(fid),
                density=float(row[0]),
                mean_act=float(row[1]),
                max_act=float(row[2]),
                top_tokens=json.loads(row[3]),
                label=None if label is None else label[0],
            )
        )
    return out


def fts_match(query: str) -> str | None:
    """The FTS5 expression for user text: each word a quoted phrase, so quotes, `AND`/`OR`/
    `NOT`/`NEAR`, `*`, `^`, `:` and parentheses are searched for, never parsed as syntax; the
    last word is a prefix. Unprintable characters are dropped: FTS5 ends a string at NUL,
    and SQLite takes only UTF-8, which has no lone surrogates. None if no word is left."""
    words = "".join(c for c in query if c.isprintable() or c.isspace()).split()
    if not words:
        return None
    terms = ['"' + w.replace('"', '""') + '"' for w in words]
    terms[-1] += "*"
    return " ".join(terms)
