"""How good is a dictionary: reconstruction, sparsity and feature density of activation
batches (the loss-recovered splice with the language model is in training/heldout.py; the
training-time density window is in training/density.py).

Batch metrics stay tensors until logged, so a training step never waits on the device.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from sae.base import Dictionary
from training.density import density_summary


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
def evaluate(
    d: Dictionary,
    batches: Iterable[Tensor | tuple[Tensor, Tensor]],
    dense_threshold: float = 0.1,
) -> EvalResult:
    """Reconstruction and sparsity over `batches` (raw activations; the dictionary is final).
    An item is a batch x (reconstructed as itself) or a pair (x, y): a transcoder's input and
    the target its reconstruction is measured against."""
    err = sq = n = 0.0
    sum_y: Tensor | None = None
    l0_sum = 0.0
    fired = torch.zeros(d.d_sae, device=d.device)
    count = 0
    for item in batches:
        x, y = item if isinstance(item, tuple) else (item, item)
        x, y = x.to(d.device, d.dtype), y.to(d.device, d.dtype)
        out = d(x)
        err += float((out.x_hat - y).pow(2).sum())
        sq += float(y.pow(2).sum())
        sum_y = y.sum(0) if sum_y is None else sum_y + y.sum(0)
        active = out.feature_acts != 0
        l0_sum += float(active.sum())
        fired += active.sum(0)
        count += x.shape[0]
        n += y.numel()
    if count == 0 or sum_y is None:
        raise ValueError("evaluate() got no batches")
    # Total variance around the global mean: sum ||y||^2 - N ||mean||^2.
    total = sq - float(sum_y.pow(2).sum()) / count
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
