"""The feature store on a real SQLite file: round trip, search, labels across re-analysis,
and readers + a writer at once (threads and processes)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from analysis.store import FeatureStore
from analysis.store_records import FeatureArrays, StoreMeta
from sae.errors import UserError

F, N, W, Q, B, K = 6, 3, 5, 4, 8, 3
VOCAB = ["<bos>", " def", " import", " return", "(", ")", " class", " x", " y", " self"]


def make_arrays(generation_mark: int = 1, d_sae: int = F) -> FeatureArrays:
    """Synthetic analysis whose numbers encode `generation_mark`, so a reader can tell
    whether what it saw came from one analysis or a mix."""
    rng = np.random.default_rng(generation_mark)
    meta = StoreMeta(
        dictionary="dict",
        hook_name="blocks.0.mlp.hook_post",
        model_name="tiny",
        d_in=8,
        d_sae=d_sae,
        n_tokens=1000,
        n_top=N,
        n_quantiles=2,
        examples_per_quantile=2,
        context_before=2,
        context_after=2,
        histogram_edges=np.linspace(0, 1, B + 1).tolist(),
        created_at="2026-01-01T00:00:00+00:00",
        generation=0,
        extra={"mark": generation_mark},
    )
    n_fires = np.full(d_sae, 10 * generation_mark, dtype=np.int64)
    hist = np.zeros((d_sae, B), dtype=np.int64)
    hist[:, 0] = n_fires  # histogram total == n_fires: a consistency check for readers
    top_ids = rng.integers(1, len(VOCAB), size=(d_sae, N, W)).astype(np.int32)
    top_ids[:, :, 0] = -1  # left padding, as at the start of a context
    top_acts = np.full((d_sae, N, W), float(generation_mark), dtype=np.float32)
    top_acts[:, :, 2] = generation_mark + np.arange(N, 0, -1)
    top_seq = np.tile(np.arange(N, dtype=np.int64), (d_sae, 1))
    top_seq[-1, 1:] = -1  # the last feature fired only once
    q_seq = np.tile(np.arange(Q, dtype=np.int64), (d_sae, 1))
    # Feature 1 always maxes on " import" (id 2) and promotes " class".
    top_ids[1, :, 2] = 2
    promoted_ids = np.tile(np.array([6, 7, 8], dtype=np.int32), (d_sae, 1))
    promoted_ids[1] = [6, 3, 4]
    return FeatureArrays(
        meta=meta,
        vocab=VOCAB,
        n_fires=n_fires,
        sum_acts=n_fires * 0.5,
        max_act=top_acts[:, 0, 2].copy(),
        hist_counts=hist,
        top_token_ids=top_ids,
        top_acts=top_acts,
        top_sequence=top_seq,
        top_position=np.full((d_sae, N), 7, dtype=np.int32),
        q_token_ids=rng.integers(0, len(VOCAB), size=(d_sae, Q, W)).astype(np.int32),
        q_acts=np.ones((d_sae, Q, W), dtype=np.float32),
        q_sequence=q_seq,
        q_position=np.zeros((d_sae, Q), dtype=np.int32),
        q_bucket=np.tile(np.array([0, 0, 1, 1], dtype=np.int16), (d_sae, 1)),
        promoted_ids=promoted_ids,
        promoted_values=np.tile(np.array([3.0, 2.0, 1.0], dtype=np.float32), (d_sae, 1)),
        suppressed_ids=np.tile(np.array([1, 2, 3], dtype=np.int32), (d_sae, 1)),
        suppressed_values=np.tile(np.array([-3.0, -2.0, -1.0], dtype=np.float32), (d_sae, 1)),
    )


def test_round_trip(tmp_path: Path) -> None:
    arrays = make_arrays(1)
    with FeatureStore.open(tmp_path) as store:
        assert not store.has_statistics()
        meta = store.replace_statistics(arrays)
    assert meta.generation == 1
    with FeatureStore.open(tmp_path, readonly=True) as store:
        assert store.meta().extra == {"mark": 1}
        rec = store.feature(1)
        assert rec.n_fires == 10 and rec.density == pytest.approx(0.01)
        assert rec.mean_act == pytest.approx(0.5)
        assert rec.max_act == pytest.approx(1 + N)
        assert rec.top_tokens == [" import"]
        assert [e.token for e in rec.promoted] == [" class", " return", "("]
        assert rec.suppressed[0].value == pytest.approx(-3.0)
        assert sum(rec.histogram.counts) == 10 and len(rec.histogram.edges) == B + 1
        ex = store.top_examples(1)
        assert len(ex) == N
        first = ex[0]
        assert first.token_ids == arrays.top_token_ids[1, 0, 1:].tolist()  # padding dropped
        assert first.tokens[first.max_index] == " import"
        assert first.max_act == pytest.approx(1 + N) == first.acts[first.max_index]
        assert [e.max_act for e in ex] == sorted((e.max_act for e in ex), reverse=True)
        assert len(store.top_examples(F - 1)) == 1  # empty slots are not examples
        assert [e.max_index for e in store.top_examples(1, offset=1, limit=1)] == [1]
        qs = store.quantile_examples(0)
        assert [e.quantile for e in qs] == [0, 0, 1, 1]
        page = store.features(offset=1, limit=2)
        assert [s.feature_id for s in page] == [1, 2]
        by_max = store.features(order_by="max_act", descending=True, limit=F)
        assert [s.feature_id for s in by_max] == list(range(F))  # ties by feature_id
        with pytest.raises(UserError, match="out of range"):
            store.feature(F)
        with pytest.raises(UserError, match="read-only"):
            store.add_label(0, "x", "me")


def test_search_labels_and_tokens(tmp_path: Path) -> None:
    with FeatureStore.open(tmp_path) as store:
        store.replace_statistics(make_arrays(1))
        store.add_label(3, "Python import statements", "alice")
        assert [s.feature_id for s in store.search("statements")] == [3]
        assert [s.feature_id for s in store.search("pyth")] == [3]  # prefix on the last word
        assert store.search("statements")[0].label == "Python import statements"
        hits = [s.feature_id for s in store.search("import")]
        assert hits[:1] == [3]  # labels weigh more than tokens
        assert 1 in hits
        assert [s.feature_id for s in store.search(' "unbalanced (')] == []  # never FTS syntax
        assert store.search("   ") == []


def test_labels_survive_reanalysis(tmp_path: Path) -> None:
    with FeatureStore.open(tmp_path) as store:
        store.replace_statistics(make_arrays(1))
        store.add_label(2, "closing parenthesis", "bob")
        store.add_label(2, "end of call", "carol")
        first_dir = {p.name for p in tmp_path.glob("arrays-*")}
        store.replace_statistics(make_arrays(2))
        store.replace_statistics(make_arrays(3))
        assert store.meta().generation == 3 and store.meta().extra == {"mark": 3}
        rec = store.feature(2)
        assert rec.n_fires == 30
        assert [(lab.text, lab.author) for lab in rec.labels] == [
            ("closing parenthesis", "bob"),
            ("end of call", "carol"),
        ]
        assert [s.feature_id for s in store.search("parenthesis")] == [2]
        # Only the current and the previous generation's arrays are kept.
        dirs = {p.name for p in tmp_path.glob("arrays-*")}
        assert len(dirs) == 2 and not dirs & first_dir


def test_failed_reanalysis_keeps_old(tmp_path: Path) -> None:
    with FeatureStore.open(tmp_path) as store:
        store.replace_statistics(make_arrays(1))
        bad = make_arrays(2)
        bad.max_act = bad.max_act[:-1]
        with pytest.raises(ValueError, match="max_act"):
            store.replace_statistics(bad)
        assert store.meta().extra == {"mark": 1}


def test_readonly_missing_store(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="sae analyze"):
        FeatureStore.open(tmp_path / "nothing", readonly=True)


# -- concurrency: two readers and one writer on one real file ---------------------------------

N_LABELS = 40
N_REANALYSES = 4


def _writer(root: str) -> None:
    with FeatureStore.open(root) as store:
        for i in range(N_LABELS):
            store.add_label(i % F, f"label number {i}", "writer")
            if i % (N_LABELS // N_REANALYSES) == 0:
                store.replace_statistics(make_arrays(2 + i))


def _read_loop(root: str, stop: threading.Event | None, deadline: float) -> int:
    """Read until told to stop; every read must be internally consistent. Returns reads."""
    reads = 0
    with FeatureStore.open(root, readonly=True) as store:
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            for f in range(F):
                rec = store.feature(f)
                assert sum(rec.histogram.counts) == rec.n_fires  # one generation, not a mix
                ex = store.top_examples(f, limit=1)
                assert ex and ex[0].acts[ex[0].max_index] == ex[0].max_act
                store.search("label")
                reads += 1
            if stop is None and reads > 200:
                break
    return reads


def _reader_process(root: str, deadline: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    try:
        out.put(("ok", _read_loop(root, None, deadline)))
    except BaseException as e:  # report any failure to the parent
        out.put(("error", repr(e)))


@pytest.mark.slow
def test_two_readers_one_writer(tmp_path: Path) -> None:
    root = str(tmp_path)
    with FeatureStore.open(root) as store:
        store.replace_statistics(make_arrays(1))
    ctx = mp.get_context("spawn")
    deadline = time.monotonic() + 30
    results: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    reader_proc = ctx.Process(target=_reader_process, args=(root, deadline, results))
    writer = ctx.Process(target=_writer, args=(root,))
    stop = threading.Event()
    thread_result: list[object] = []

    def thread_reader() -> None:
        try:
            thread_result.append(_read_loop(root, stop, deadline))
        except BaseException as e:
            thread_result.append(e)

    reader_thread = threading.Thread(target=thread_reader)
    reader_proc.start()
    reader_thread.start()
    writer.start()
    writer.join(timeout=30)
    stop.set()
    reader_thread.join(timeout=30)
    reader_proc.join(timeout=30)
    assert writer.exitcode == 0
    status, reads = results.get(timeout=5)
    assert status == "ok", reads
    assert isinstance(thread_result[0], int) and thread_result[0] > 0, thread_result
    with FeatureStore.open(root, readonly=True) as store:
        texts = {lab.text for f in range(F) for lab in store.labels(f)}
        assert texts == {f"label number {i}" for i in range(N_LABELS)}
        assert store.meta().generation == 1 + N_REANALYSES
        assert len(store.search("number")) == F
