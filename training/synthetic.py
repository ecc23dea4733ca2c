"""Synthetic superposition data with known ground truth (Elhage et al. 2022 "Toy Models of
Superposition"; Sharkey et al. 2022): many sparse unit features packed in fewer dimensions.

    x = sum_i  a_i * m_i * g_i,   a_i ~ Bernoulli(p_i),  m_i ~ Uniform(lo, hi),  |g_i| = 1

Firing probabilities p_i vary log-uniformly between `p_min` and `p_max`, so some features are
common and some rare, as in language models. A dictionary trained on this data should find
decoder rows close to the g_i; `recovery` measures how well it did.

The source is an iterable with `state_dict()`/`load_state_dict()`: batch j is drawn from a
generator seeded by (seed, j), so a resumed iteration yields exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


@dataclass
class SyntheticConfig:
    """Ground-truth features and how they fire."""

    d_in: int = 64
    """Dimension of the activations."""
    n_features: int = 256
    """Number of true features (more than d_in: superposition)."""
    p_min: float = 0.005
    """Firing probability of the rarest feature."""
    p_max: float = 0.05
    """Firing probability of the most common feature."""
    magnitude_low: float = 0.5
    """Smallest magnitude of an active feature."""
    magnitude_high: float = 1.5
    """Largest magnitude of an active feature."""
    noise: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every activation."""
    seed: int = 0
    """Seed of the features, the probabilities and the batches."""


class SyntheticActivations:
    """An iterable of [batch_size, d_in] batches with exact, resumable order."""

    def __init__(
        self, cfg: SyntheticConfig, batch_size: int, n_batches: int | None = None, offset: int = 0
    ) -> None:
        self.cfg = cfg
        self.batch_size = batch_size
        self.n_batches = n_batches
        self.offset = offset
        """Batch index where the stream starts (use a large offset for held-out data)."""
        gen = torch.Generator().manual_seed(cfg.seed)
        g = torch.randn(cfg.n_features, cfg.d_in, generator=gen)
        self.features: Float[Tensor, "N D"] = g / g.norm(dim=-1, keepdim=True)
        u = torch.rand(cfg.n_features, generator=gen)
        log_p = torch.log(torch.tensor(cfg.p_min)) + u * (
            torch.log(torch.tensor(cfg.p_max)) - torch.log(torch.tensor(cfg.p_min))
        )
        self.probs: Float[Tensor, " N"] = log_p.exp()
        self.position = 0

    @property
    def true_l0(self) -> float:
        """Expected number of active true features per activation."""
        return float(self.probs.sum())

    def batch(self, index: int) -> Float[Tensor, "B D"]:
        """Batch `index` of the stream (deterministic)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.offset + index + 1)
        active = torch.rand(self.batch_size, cfg.n_features, generator=gen) < self.probs
        mags = cfg.magnitude_low + (cfg.magnitude_high - cfg.magnitude_low) * torch.rand(
            self.batch_size, cfg.n_features, generator=gen
        )
        x = (active * mags) @ self.features
        if cfg.noise > 0:
            x = x + cfg.noise * torch.randn(x.shape, generator=gen)
        return x

    def __iter__(self) -> Iterator[Tensor]:
        while self.n_batches is None or self.position < self.n_batches:
            x = self.batch(self.position)
            self.position += 1
            yield x

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


@dataclass
class Recovery:
    """How well a dictionary's decoder rows match the true features."""

    mean_max_cosine: float
    """For each true feature, the best cosine with any decoder row; averaged."""
    fraction_recovered: float
    """Fraction of true features with a decoder row at cosine > threshold."""
    threshold: float


@torch.no_grad()
def recovery(
    true_features: Float[Tensor, "N D"], W_dec: Float[Tensor, "F D"], threshold: float = 0.9
) -> Recovery:
    g = true_features / true_features.norm(dim=-1, keepdim=True)
    w = W_dec.float().cpu()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best = (g @ w.T).max(dim=-1).values
    return Recovery(
        mean_max_cosine=float(best.mean()),
        fraction_recovered=float((best > threshold).float().mean()),
        threshold=threshold,
    )
