"""Training-time feature density: a trailing window that starts after the sparsity warm-up,
says how many tokens it holds until it is full, and survives a checkpoint."""

from __future__ import annotations

import torch

from tests.training.helpers import data, small_cfg, with_
from training.density import DensityTracker, density_row
from training.metrics import read_metrics
from training.trainer import Trainer

CPU = torch.device("cpu")


def counts(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_window_ignores_the_warmup_and_slides():
    t = DensityTracker(2, CPU, window_tokens=20, start_tokens=10, buckets=2)
    t.update(counts(10, 10), 10, tokens_before=0)  # the warm-up: not counted
    assert t.counted_tokens == 0 and t.current(partial=True) is None
    t.update(counts(10, 0), 10, tokens_before=10)
    assert t.current() is None  # one stretch of two closed
    assert density_row(t) == {"density_tokens": 10.0}
    assert t.current(partial=True).tolist() == [1.0, 0.0]
    t.update(counts(0, 0), 10, tokens_before=20)
    assert t.current().tolist() == [0.5, 0.0]
    t.update(counts(0, 5), 10, tokens_before=30)  # the first stretch leaves the window
    assert t.current().tolist() == [0.0, 0.25]
    row = density_row(t)
    assert row["density_tokens"] == 20 and row["dead_fraction"] == 0.5


def test_state_dict_round_trip_continues_identically():
    a = DensityTracker(3, CPU, window_tokens=30, buckets=3)
    b = DensityTracker(3, CPU, window_tokens=30, buckets=3)
    torch.manual_seed(0)
    batches = [(torch.randint(0, 6, (3,)).float(), 6) for _ in range(12)]
    for i, (c, n) in enumerate(batches[:5]):
        a.update(c, n, i * n)
    b.load_state_dict(a.state_dict())
    for i, (c, n) in enumerate(batches[5:], start=5):
        a.update(c, n, i * n)
        b.update(c, n, i * n)
    assert torch.equal(a.current(), b.current())


def test_rows_say_not_enough_tokens_until_the_window_fills(tmp_path):
    cfg = small_cfg(tmp_path, steps=40)  # warm-up 2 steps; default window (40-2)*64/4 tokens
    cfg = with_(cfg, resample=with_(cfg.resample, enabled=False))
    assert cfg.sparsity_warmup_tokens() == 2 * 64
    assert cfg.density_window_tokens() == 38 * 64 // 4
    Trainer(cfg, d_in=16).fit(data())
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    # 8 buckets of ceil(608 / 8) = 76 tokens: two 64-token batches close one, so the window
    # fills 16 steps after the 2 of warm-up.
    early = [r for r in rows if r["step"] < 2 + 16]
    assert all("dead_fraction" not in r for r in early)
    assert [r["density_tokens"] for r in early[:4]] == [0, 0, 64, 128]
    late = [r for r in rows if r["step"] >= 2 + 16]
    assert late and all("dead_fraction" in r for r in late)
    assert all(r["density_tokens"] >= cfg.density_window_tokens() for r in late)
