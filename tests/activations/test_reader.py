"""The shuffled cache reader: every row once per epoch, mixed across shards, seeded, resumable."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from activations.cache import CacheConfig, cache_activations
from activations.cache_format import META_COLUMNS, read_cache_config
from activations.reader import CachedActivations, CacheShards
from activations.source import ResumableSource
from activations.text import TextConfig
from sae.errors import UserError
from tests.helpers import make_docs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOK = "blocks.0.hook_resid_post"
N_ROWS = 2000
SHARD = 300


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, tiny_lm_dir: Path, tiny_model) -> Path:
    root = tmp_path_factory.mktemp("reader")
    text = TextConfig(dataset=str(make_docs(root / "docs", 60)), context_size=32)
    cfg = CacheConfig(
        out=root / "cache",
        model=str(tiny_lm_dir),
        hooks=(HOOK, "blocks.0.mlp.hook_post"),
        text=text,
        dtype="float32",
        max_tokens=N_ROWS,
        shard_tokens=SHARD,
    )
    return cache_activations(cfg, model=tiny_model).path


def shard_rows(cache_dir: Path) -> list[torch.Tensor]:
    files = sorted((cache_dir / HOOK).glob("shard-*.safetensors"))
    return [load_file(f)["activations"] for f in files]


def keys(batch: torch.Tensor) -> list[bytes]:
    return [row.numpy().tobytes() for row in batch]


def read(reader: CachedActivations) -> list[torch.Tensor]:
    return list(reader)


def test_every_row_exactly_once_per_epoch_over_two_epochs(cache_dir):
    all_rows = Counter(k for s in shard_rows(cache_dir) for k in keys(s))
    # (equal prefixes give equal rows, so rows are compared as multisets)
    assert sum(all_rows.values()) == N_ROWS and len(all_rows) > 0.9 * N_ROWS
    reader = CachedActivations(
        cache_dir, HOOK, batch_size=128, epochs=2, seed=3, buffer_bytes=64 * 32 * 4, chunk_rows=50
    )
    batches = read(reader)
    assert len(batches) == len(reader) == 2 * 16  # 2000 = 15 * 128 + 80
    assert all(b.shape == (128, 32) for b in batches[:15]) and batches[15].shape == (80, 32)
    epoch0 = Counter(k for b in batches[:16] for k in keys(b))
    epoch1 = Counter(k for b in batches[16:] for k in keys(b))
    assert epoch0 == all_rows and epoch1 == all_rows
    assert keys(batches[0]) != keys(batches[16])  # a new order each epoch


def test_batches_mix_rows_from_many_shards_and_positions(cache_dir):
    where = {k: i for i, s in enumerate(shard_rows(cache_dir)) for k in keys(s)}
    first = next(iter(CachedActivations(cache_dir, HOOK, batch_size=256, seed=0, chunk_rows=32)))
    shards_hit = {where[k] for k in keys(first)}
    assert len(shards_hit) >= 5  # 7 shards in the cache


def test_prefetch_thread_gives_the_same_batches_as_the_plain_path(cache_dir):
    plain = read(CachedActivations(cache_dir, HOOK, batch_size=70, chunk_rows=30, prefetch=0))
    ahead = read(CachedActivations(cache_dir, HOOK, batch_size=70, chunk_rows=30, prefetch=3))
    assert len(plain) == len(ahead) == 29
    assert all(torch.equal(x, y) for x, y in zip(plain, ahead, strict=True))
    reader = CachedActivations(cache_dir, HOOK, batch_size=70, prefetch=2)
    it = iter(reader)
    next(it)
    it.close()  # abandoning the iterator stops the prefetch thread
    assert reader.state_dict()["position"] == 70


def test_same_seed_same_batches_other_seed_other_batches(cache_dir):
    a = read(CachedActivations(cache_dir, HOOK, batch_size=100, seed=1, chunk_rows=40))
    b = read(CachedActivations(cache_dir, HOOK, batch_size=100, seed=1, chunk_rows=40))
    c = read(CachedActivations(cache_dir, HOOK, batch_size=100, seed=2, chunk_rows=40))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_resume_from_state_dict_gives_the_same_remaining_batches(cache_dir):
    kwargs = dict(batch_size=96, seed=5, epochs=2, buffer_bytes=500 * 32 * 4, chunk_rows=64)
    full = read(CachedActivations(cache_dir, HOOK, **kwargs))
    for stop in (1, 7, 20, 21, len(full) - 1):
        first = CachedActivations(cache_dir, HOOK, **kwargs)
        it = iter(first)
        for _ in range(stop):
            next(it)
        state = first.state_dict()
        again = CachedActivations(cache_dir, HOOK, **kwargs)
        again.load_state_dict(state)
        rest = read(again)
        assert len(rest) == len(full) - stop
        assert all(torch.equal(x, y) for x, y in zip(rest, full[stop:], strict=True))
    other = CachedActivations(cache_dir, HOOK, **{**kwargs, "seed": 6})
    with pytest.raises(UserError, match="seed"):
        other.load_state_dict(state)


def test_ranks_read_disjoint_rows_in_equal_full_batches(cache_dir):
    readers = [
        CachedActivations(cache_dir, HOOK, batch_size=64, rank=r, world_size=3, chunk_rows=50)
        for r in range(3)
    ]
    per_rank = [read(r) for r in readers]
    assert len({len(b) for b in per_rank}) == 1 and all(
        b.shape[0] == 64 for bs in per_rank for b in bs
    )
    seen = [Counter(k for b in bs for k in keys(b)) for bs in per_rank]
    together = seen[0] + seen[1] + seen[2]
    all_rows = Counter(k for s in shard_rows(cache_dir) for k in keys(s))
    assert all(together[k] <= all_rows[k] for k in together)  # disjoint: no row twice
    assert sum(together.values()) > 0.85 * N_ROWS


def test_output_dtype_device_and_manifest_statistics(cache_dir):
    reader = CachedActivations(cache_dir, HOOK, batch_size=500, dtype=torch.float64)
    batch = next(iter(reader))
    assert batch.dtype == torch.float64 and batch.device.type == "cpu" and reader.d_in == 32
    rows = torch.cat(shard_rows(cache_dir)).double()
    assert torch.allclose(reader.mean.double(), rows.mean(0), atol=1e-6)
    assert reader.mean_squared_norm == pytest.approx(float(rows.pow(2).sum(1).mean()))


def test_opening_errors(cache_dir, tmp_path):
    with pytest.raises(UserError, match="several hooks"):
        CachedActivations(cache_dir)
    with pytest.raises(UserError, match="no cached hook"):
        CachedActivations(cache_dir, "blocks.0.hook_resid_pre")
    with pytest.raises(UserError, match="does not exist"):
        CachedActivations(tmp_path / "nothing")
    assert CachedActivations(cache_dir / HOOK).hook_name == HOOK  # a hook folder opens directly


def test_reader_core_maps_every_shard_and_reads_its_columns(cache_dir, tmp_path):
    core = CacheShards(cache_dir, HOOK)
    files = sorted((cache_dir / HOOK).glob("shard-*.safetensors"))
    assert len(core) == len(files) == 7 and core.n_rows == N_ROWS and core.d_in == 32
    for i, f in enumerate(files):
        stored = load_file(f)
        assert torch.equal(core.activations[i], stored["activations"])
        columns = core.meta_columns(i)
        assert list(columns) == list(META_COLUMNS)
        for name, dtype in META_COLUMNS.items():
            assert columns[name].dtype == dtype and torch.equal(columns[name], stored[name])
    assert read_cache_config(cache_dir) == read_cache_config(cache_dir / HOOK) is not None
    assert read_cache_config(tmp_path) is None


def test_readers_are_resumable_batch_sources(cache_dir):
    assert isinstance(CachedActivations(cache_dir, HOOK), ResumableSource)
    assert not isinstance([torch.zeros(2, 32)], ResumableSource)  # a BatchSource only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_land_on_the_gpu(cache_dir):
    batch = next(iter(CachedActivations(cache_dir, HOOK, batch_size=64, device="cuda")))
    assert batch.device.type == "cuda" and batch.dtype == torch.float32


def test_a_held_out_tail_of_whole_contexts_that_the_training_reader_never_reads(cache_dir):
    from activations.contexts import cache_tail

    shards = CacheShards(cache_dir, HOOK)
    meta = [shards.meta_columns(i) for i in range(len(shards))]
    seq = torch.cat([m["sequence"] for m in meta])
    tok = torch.cat([m["token_ids"] for m in meta])
    rows = torch.cat(shard_rows(cache_dir))
    tail = cache_tail(cache_dir, HOOK, min_rows=450, fill_token=-1)  # cut inside shard 5
    assert 450 <= len(tail.acts) < 450 + 32 and tail.start == N_ROWS - len(tail.acts)
    assert seq[tail.start - 1] != seq[tail.start]  # no context is split
    assert torch.equal(tail.acts, rows[tail.start :])
    held_contexts = seq[tail.start :].unique()
    assert tail.tokens.shape == (len(held_contexts), 32)
    assert int(tail.valid.sum()) == len(tail.acts)
    assert torch.equal(tail.tokens[tail.valid], tok[tail.start :].long())
    assert (tail.tokens[~tail.valid] == -1).all()  # the BOS the cache dropped

    reader = CachedActivations(
        cache_dir, HOOK, batch_size=100, chunk_rows=64, rows=(0, tail.start), prefetch=0
    )
    seen = Counter(k for b in read(reader) for k in keys(b))
    assert seen == Counter(keys(rows[: tail.start]))
    with pytest.raises(UserError, match="too few to hold out"):
        cache_tail(cache_dir, HOOK, min_rows=N_ROWS // 2, fill_token=0)


def test_the_head_of_an_evaluation_cache_is_whole_contexts(cache_dir):
    from activations.contexts import cache_head

    shards = CacheShards(cache_dir, HOOK)
    seq = torch.cat([shards.meta_columns(i)["sequence"] for i in range(len(shards))])
    rows = torch.cat(shard_rows(cache_dir))
    head = cache_head(cache_dir, HOOK, min_rows=450, fill_token=-1)  # ends inside shard 2
    assert head.start == 0 and 450 <= head.stop < 450 + 31
    assert seq[head.stop - 1] != seq[head.stop]  # no context is split
    assert torch.equal(head.acts, rows[: head.stop])
    assert head.tokens.shape == (len(seq[: head.stop].unique()), 32)
    assert int(head.valid.sum()) == head.stop
    # Everything: every context but the last, which the cache's end cut short (2000 = 64 x 31
    # + 16 rows).
    every = cache_head(cache_dir, HOOK, min_rows=None, fill_token=-1)
    assert every.stop == 64 * 31 and N_ROWS % 31 == 16
    with pytest.raises(UserError, match="fewer than the 1990 asked"):
        cache_head(cache_dir, HOOK, min_rows=1990, fill_token=0)
