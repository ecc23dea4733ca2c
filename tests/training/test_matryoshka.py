"""Matryoshka training on realistic synthetic data: its leading latents reconstruct on their
own, which a BatchTopK dictionary of the same width, L0 and samples does not."""

from __future__ import annotations

import torch

from tests.training.helpers import with_
from training.config import (
    DictionaryShape,
    LoggingConfig,
    ObjectiveConfig,
    OptimConfig,
    ResampleConfig,
    TrainConfig,
)
from training.synthetic import RealisticActivations, RealisticConfig
from training.trainer import Trainer

TRUTH = RealisticConfig(d_in=32, n_features=256, n_trees=8, depth=1, orthogonalize_steps=5)


def prefix_fvu(d, x: torch.Tensor, width: int) -> float:
    """FVU of x reconstructed from the latents before `width` only."""
    with torch.no_grad():
        f = d.encode(x)
        x_hat = f[:, :width] @ d.W_dec[:width] + d.b_dec
        return float((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def test_matryoshka_prefixes_reconstruct_alone(tmp_path):
    truth = RealisticActivations(TRUTH, batch_size=128)
    k = round(truth.top_l0(64))
    base = TrainConfig(
        total_tokens=400 * 128,
        batch_size=128,
        out_dir=tmp_path / "batchtopk",
        checkpoint_every_steps=0,
        dictionary=DictionaryShape(d_sae=64, init_tokens=1024),
        objective=ObjectiveConfig(name="batchtopk", k=k, dead_tokens=50 * 128),
        optim=OptimConfig(lr=3e-3, warmup_steps=20),
        resample=ResampleConfig(enabled=False),
        logging=LoggingConfig(log_every_steps=100, progress=False, plots=False),
    )
    nested = with_(
        base,
        out_dir=tmp_path / "matryoshka",
        objective=with_(base.objective, name="matryoshka_batchtopk"),
    )
    x = truth.held_out(10**9).batch(0)
    fvu = {}
    for cfg in (base, nested):
        d = Trainer(cfg, d_in=32).fit(RealisticActivations(TRUTH, batch_size=128)).dictionary
        fvu[cfg.objective.name] = [prefix_fvu(d, x, w) for w in (8, 16, 64)]
    m, b = fvu["matryoshka_batchtopk"], fvu["batchtopk"]
    assert m[0] < b[0] - 0.06 and m[1] < b[1] - 0.1, fvu  # the nested prefixes work alone
    assert m[2] < b[2] + 0.05, fvu  # at little cost to the whole dictionary
