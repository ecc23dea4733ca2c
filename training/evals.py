"""How good is a dictionary: reconstruction, sparsity and feature density of activation
batches (the loss-recovered splice with the language model is in training/heldout.py).

Batch metrics stay tensors until logged, so a training step never waits on the device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from sae.base import Dictionary


def batch_metrics(x: Float[Tensor, "B D"], x_hat: Float[Tensor, "B D"], f: Tensor) -> dict:
    """MSE (per element), explained variance, FVU and L0 of one batch, as 0-d tensors."""
    x, x_hat = x.float(), x_hat.float()
    err = (x_hat - x).pow(2).sum()
    total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    fvu = err / total
    return {
        "mse": err / x.numel(),
        "explained_variance": 1.0 - fvu,
        "fvu": fvu,
        "l0": (f != 0).float().sum(-1).mean(),
    }


class DensityTracker:
    """Fraction of tokens each feature fires on, over consecutive windows of tokens."""

    def __init__(self, d_sae: int, device: torch.device, window_tokens: int) -> None:
        self.window_tokens = window_tokens
        self.counts = torch.zeros(d_sae, device=device)
        self.tokens = 0
        self.last: Tensor | None = None
        """Density of each feature over the last completed window (None before the first)."""

    def update(self, fired_counts: Float[Tensor, " F"], n_tokens: int) -> None:
        self.counts += fired_counts
        self.tokens += n_tokens
        if self.tokens >= self.window_tokens:
            self.last = (self.counts / self.tokens).cpu()
            self.counts.zero_()
            self.tokens = 0

    def current(self) -> Tensor | None:
        """The last completed window, or the partial one if none has completed yet."""
        if self.last is not None:
            return self.last
        if self.tokens == 0:
            return None
        return (self.counts / self.tokens).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.clone(), "tokens": self.tokens, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts.copy_(state["counts"])
        self.tokens = int(state["tokens"])
        self.last = state["last"]


def density_summary(density: Float[Tensor, " F"], dense_threshold: float = 0.1) -> dict:
    """Dead fraction (never fired in the window), dense fraction, and log10-density quantiles."""
    log_d = torch.log10(density.clamp_min(1e-10))
    return {
        "dead_fraction": float((density == 0).float().mean()),
        "dense_fraction": float((density > dense_threshold).float().mean()),
        "log10_density_median": float(log_d.median()),
    }


@dataclass
class EvalResult:
    """A dictionary measured on held-out activation batches."""

    mse: float
    explained_variance: float
    fvu: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    density: Tensor
    """[F] fraction of evaluated tokens each feature fired on."""


@torch.no_grad()
def evaluate(d: Dictionary, batches: Iterable[Tensor], dense_threshold: float = 0.1) -> EvalResult:
    """Reconstruction and sparsity over `batches` (raw activations; the dictionary is final)."""
    err = sq = n = 0.0
    sum_x: Tensor | None = None
    l0_sum = 0.0
    fired = torch.zeros(d.d_sae, device=d.device)
    count = 0
    for x in batches:
        x = x.to(d.device, d.dtype)
        out = d(x)
        err += float((out.x_hat - x).pow(2).sum())
        sq += float(x.pow(2).sum())
        sum_x = x.sum(0) if sum_x is None else sum_x + x.sum(0)
        active = out.feature_acts != 0
        l0_sum += float(active.sum())
        fired += active.sum(0)
        count += x.shape[0]
        n += x.numel()
    if count == 0 or sum_x is None:
        raise ValueError("evaluate() got no batches")
    # Total variance around the global mean: sum ||x||^2 - N ||mean||^2.
    total = sq - float(sum_x.pow(2).sum()) / count
    fvu = err / max(total, 1e-12)
    density = (fired / count).cpu()
    summary = density_summary(density, dense_threshold)
    return EvalResult(
        mse=err / n,
        explained_variance=1.0 - fvu,
        fvu=fvu,
        l0=l0_sum / count,
        dead_fraction=summary["dead_fraction"],
        dense_fraction=summary["dense_fraction"],
        density=density,
    )
