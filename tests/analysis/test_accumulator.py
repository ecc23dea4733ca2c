"""Streaming statistics equal a brute-force computation over ALL activations, exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.accumulator import AnalysisConfig, FeatureAccumulator, sample_keys
from analysis.store_records import StoreMeta

F, T, VOCAB = 7, 8, 50


def make_stream(n_batches: int = 6, S: int = 3, seed: int = 0):
    """Batches of (tokens, sequence, codes) with many exact ties and many zeros."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(n_batches):
        tokens = torch.randint(0, VOCAB, (S, T), generator=g)
        sequence = torch.arange(b * S, (b + 1) * S)
        # Quantised values: ties everywhere; ~60% zeros; feature 5 never fires, feature 6
        # fires rarely (fewer times than n_top).
        acts = torch.randint(0, 4, (S, T, F), generator=g).float() * 0.5
        acts[torch.rand((S, T, F), generator=g) < 0.6] = 0.0
        acts[..., 5] = 0.0
        acts[..., 6] = 0.0
        if b % 3 == 0:
            acts[0, 2, 6] = 1.25
        batches.append((tokens, sequence, acts))
    return batches


def brute_force(batches, cfg: AnalysisConfig):
    tokens = torch.cat([b[0] for b in batches])  # [S_all, T]
    seqs = torch.cat([b[1] for b in batches])
    acts = torch.cat([b[2] for b in batches])  # [S_all, T, F]
    assert torch.equal(seqs, torch.arange(len(seqs)))
    flat = acts.reshape(-1, F)
    gidx = torch.arange(flat.shape[0])
    L, R = cfg.context_before, cfg.context_after

    def window(g: int, f: int):
        s, t = divmod(g, T)
        ids, vals = [], []
        for p in range(t - L, t + R + 1):
            inside = 0 <= p < T
            ids.append(int(tokens[s, p]) if inside else -1)
            vals.append(float(acts[s, p, f]) if inside else 0.0)
        return ids, vals, s, t

    out = {}
    for f in range(F):
        col = flat[:, f]
        firing = [(float(col[g]), int(g)) for g in gidx if col[g] > 0]
        ranked = sorted(firing, key=lambda vg: (-vg[0], vg[1]))[: cfg.n_top]
        keys = sample_keys(
            torch.tensor([g for _, g in firing], dtype=torch.long),
            torch.full((len(firing),), f, dtype=torch.long),
            cfg.seed,
        )
        sampled = [firing[i] for i in keys.argsort(descending=True)[: cfg.n_sampled].tolist()]
        sampled.sort(key=lambda vg: vg[0])  # stable: ties keep key order
        edges = cfg.histogram_edges().numpy()
        vals = np.array([v for v, _ in firing])
        bins = np.clip(np.searchsorted(edges, vals, side="right") - 1, 0, cfg.histogram_bins - 1)
        out[f] = {
            "top": [window(g, f) for _, g in ranked],
            "top_vals": [v for v, _ in ranked],
            "sampled_vals": [v for v, _ in sampled],
            "sampled_sets": {g for _, g in sampled},
            "n_fires": len(firing),
            "sum": float(vals.sum()) if len(vals) else 0.0,
            "hist": np.bincount(bins, minlength=cfg.histogram_bins),
        }
    return out, flat.shape[0]


def run_stream(batches, cfg: AnalysisConfig):
    acc = FeatureAccumulator(F, cfg)
    for tokens, seq, acts in batches:
        acc.update(tokens, seq, acts)
    meta = StoreMeta(
        dictionary="d", hook_name="h", model_name="m", d_in=1, d_sae=F,
        n_tokens=acc.n_tokens, n_top=cfg.n_top, n_quantiles=cfg.n_quantiles,
        examples_per_quantile=cfg.examples_per_quantile, context_before=cfg.context_before,
        context_after=cfg.context_after, histogram_edges=[], created_at="", generation=0,
    )  # fmt: skip
    return acc.result(meta, [str(i) for i in range(VOCAB)], None)


@pytest.mark.parametrize("n_top", [1, 5, 40])
def test_streaming_topn_equals_full_sort(n_top: int) -> None:
    cfg = AnalysisConfig(n_top=n_top, context_before=3, context_after=2, n_quantiles=2,
                         examples_per_quantile=3, histogram_bins=8, histogram_min=0.1,
                         histogram_max=10.0)  # fmt: skip
    batches = make_stream()
    ref, n_tokens = brute_force(batches, cfg)
    res = run_stream(batches, cfg)
    L = cfg.context_before
    for f in range(F):
        r = ref[f]
        n = len(r["top"])
        assert (res.top_sequence[f, n:] == -1).all()
        assert res.top_acts[f, :n, L].tolist() == r["top_vals"], f
        for slot, (ids, vals, s, t) in enumerate(r["top"]):
            assert res.top_token_ids[f, slot].tolist() == ids, (f, slot)
            assert res.top_acts[f, slot].tolist() == vals, (f, slot)
            assert (res.top_sequence[f, slot], res.top_position[f, slot]) == (s, t), (f, slot)
        assert res.n_fires[f] == r["n_fires"]
        assert res.sum_acts[f] == pytest.approx(r["sum"], rel=1e-12)
        assert res.hist_counts[f].tolist() == r["hist"].tolist()
        assert res.max_act[f] == (r["top_vals"][0] if n else 0.0)
        # The sample: exactly the firings with the largest hash keys, sorted by activation.
        m = len(r["sampled_sets"])
        got = {
            int(s) * T + int(p)
            for s, p in zip(res.q_sequence[f, :m], res.q_position[f, :m], strict=True)
        }
        assert got == r["sampled_sets"]
        assert res.q_acts[f, :m, L].tolist() == r["sampled_vals"]
        assert (res.q_sequence[f, m:] == -1).all()
        buckets = res.q_bucket[f, :m].tolist()
        assert buckets == sorted(buckets) and (m == 0 or buckets[-1] == cfg.n_quantiles - 1)
    assert res.meta.n_tokens == n_tokens


def test_ties_prefer_earlier_tokens() -> None:
    """All activations equal: the top-N are the first N tokens, in order."""
    cfg = AnalysisConfig(n_top=4, context_before=1, context_after=0)
    acc = FeatureAccumulator(1, cfg)
    for b in range(3):
        acc.update(torch.zeros(2, T, dtype=torch.long), torch.arange(2 * b, 2 * b + 2),
                   torch.ones(2, T, 1))  # fmt: skip
    _, _, _, sequence, position = acc.top.sorted()
    assert sequence[0].tolist() == [0, 0, 0, 0]
    assert position[0].tolist() == [0, 1, 2, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_accumulator_equals_cpu() -> None:
    cfg = AnalysisConfig(n_top=5, context_before=3, context_after=2, n_quantiles=2,
                         examples_per_quantile=3)  # fmt: skip
    batches = make_stream()
    cpu = run_stream(batches, cfg)
    acc = FeatureAccumulator(F, cfg, "cuda")
    for tokens, seq, acts in batches:
        acc.update(tokens.cuda(), seq.cuda(), acts.cuda())
    gpu = acc.result(cpu.meta, cpu.vocab, None)
    for name in cpu.ARRAY_FIELDS:
        if name == "sum_acts":  # summation order differs on the device
            np.testing.assert_allclose(cpu.sum_acts, gpu.sum_acts, rtol=1e-12)
        else:
            assert np.array_equal(getattr(cpu, name), getattr(gpu, name)), name
