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

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
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


class _IndexedBatches:
    """A resumable source whose batch i is a pure function of i (`batch(i)`)."""

    n_batches: int | None
    position: int

    def batch(self, index: int) -> Tensor:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Tensor]:
        while self.n_batches is None or self.position < self.n_batches:
            x = self.batch(self.position)
            self.position += 1
            yield x

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


class SyntheticActivations(_IndexedBatches):
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


@dataclass
class RealisticConfig:
    """Ground truth with the structure real features have (after SAELens's SynthSAEBench,
    Chanin et al. 2025, and the hierarchies of Bussmann et al. 2025)."""

    d_in: int = 256
    """Dimension of the activations (fewer than n_features: superposition)."""
    n_features: int = 4096
    """Number of true features, roots and children together."""
    p_max: float = 0.2
    """Firing probability of the most frequent top-level feature."""
    zipf_exponent: float = 0.5
    """Top-level feature of frequency rank r fires with probability p_max * (r + 1)^-exponent."""
    n_trees: int = 64
    """Hierarchies: top-level features with descendants, drawn among the 4 * n_trees most
    frequent top-level features."""
    branching: int = 3
    """Children of every node of a hierarchy above its deepest level."""
    depth: int = 2
    """Levels of children under each hierarchy's root."""
    child_fire: float = 0.7
    """Probability that one of a firing parent's children fires (never two: siblings are
    mutually exclusive); split among the children in random proportions."""
    correlation_rank: int = 16
    """Shared latent factors of the low-rank firing correlations (0: independent); each
    top-level feature loads on one of them, so features of a factor fire together."""
    correlation_scale: float = 0.5
    """Standard deviation of a top-level feature's log firing odds across samples."""
    magnitude_mean_low: float = 0.5
    """Smallest per-feature mean magnitude."""
    magnitude_mean_high: float = 2.0
    """Largest per-feature mean magnitude (means are uniform in between)."""
    magnitude_cv: float = 0.3
    """Standard deviation of a feature's magnitude as a fraction of its mean."""
    orthogonalize_steps: int = 20
    """Gradient steps pushing apart feature directions at |cosine| above the random level."""
    bias_norm: float = 1.0
    """Norm of the constant vector added to every activation."""
    noise: float = 0.0
    """Standard deviation of isotropic Gaussian noise added to every activation."""
    seed: int = 0
    """Seed of the features, the hierarchy, the probabilities and the batches."""

    def __post_init__(self) -> None:
        if self.n_features - self.n_trees * self.n_descendants() < 4 * self.n_trees:
            raise ValueError("too few features for n_trees hierarchies of this shape")
        if not 0 < self.p_max <= 1 or not 0 <= self.child_fire <= 1:
            raise ValueError("p_max must be in (0, 1] and child_fire in [0, 1]")

    def n_descendants(self) -> int:
        return sum(self.branching**level for level in range(1, self.depth + 1))


class GroundTruthBatch(NamedTuple):
    """A batch and the true features active in it, one entry per (row, feature) event."""

    x: Float[Tensor, "B D"]
    rows: Int[Tensor, " E"]
    features: Int[Tensor, " E"]
    magnitudes: Float[Tensor, " E"]


def _geometric_firings(
    probs: Float[Tensor, " N"], rows: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """(row, feature) pairs of independent Bernoulli(probs) draws over `rows` rows, sampled
    sparsely from geometric gaps (O(fired) rather than O(rows * N)); exact unless a feature's
    count exceeds its mean by 6 standard deviations."""
    feature = (probs > 0).nonzero().squeeze(-1)
    p = probs[feature].clamp(max=0.999)
    mean = rows * p
    draws = (mean + 6 * mean.sqrt() + 6).ceil().long()
    feature = torch.repeat_interleave(feature, draws)
    u = torch.rand(feature.numel(), generator=gen).clamp_min(1e-12)
    log_q = torch.repeat_interleave(torch.log1p(-p), draws)
    gaps = (u.log() / log_q).floor().long() + 1
    ends = draws.cumsum(0)
    csum = gaps.cumsum(0)
    start = torch.cat([csum.new_zeros(1), csum[ends[:-1] - 1]])
    position = csum - torch.repeat_interleave(start, draws) - 1
    keep = position < rows
    return position[keep], feature[keep]


class RealisticActivations(_IndexedBatches):
    """An iterable of [batch_size, d_in] batches of `RealisticConfig` data, generated on the fly
    (batch j from a generator seeded by (seed, offset + j)), resumable like SyntheticActivations.

    Top-level features fire with Zipfian probabilities modulated per sample by low-rank factors:
    p_i * exp(+-s z_k(i) - s^2 / 2) with z ~ N(0, I_rank) per sample and k(i) feature i's factor,
    mean-preserving (drawn by thinning candidates at 4 p_i), so features sharing a factor fire
    together (or avoid each other when their signs differ).
    A child fires only with its parent, at most one child per parent, with magnitude
    own_draw * parent_magnitude / parent_mean. x = sum magnitude_i * g_i + bias (+ noise).
    """

    def __init__(
        self, cfg: RealisticConfig, batch_size: int, n_batches: int | None = None, offset: int = 0
    ) -> None:
        self.cfg, self.batch_size, self.n_batches, self.offset = cfg, batch_size, n_batches, offset
        self.position = 0
        gen = torch.Generator().manual_seed(cfg.seed)
        n, n_top = cfg.n_features, cfg.n_features - cfg.n_trees * cfg.n_descendants()
        ids = torch.randperm(n, generator=gen)  # logical index -> feature id
        self.parent: Int[Tensor, " N"] = torch.full((n,), -1, dtype=torch.long)
        self.children: Int[Tensor, "N C"] = torch.full((n, cfg.branching), -1, dtype=torch.long)
        self.child_cum: Float[Tensor, "N C"] = torch.zeros(n, cfg.branching)
        self.base_probs: Float[Tensor, " N"] = torch.zeros(n)
        ranks = torch.arange(n_top, dtype=torch.float32)
        self.base_probs[ids[:n_top]] = cfg.p_max * (ranks + 1) ** -cfg.zipf_exponent
        roots = ids[torch.randperm(4 * cfg.n_trees, generator=gen)[: cfg.n_trees]]
        self.levels: list[Tensor] = []
        frontier, next_id = roots, n_top
        for _ in range(cfg.depth):
            kids = ids[next_id : next_id + frontier.numel() * cfg.branching]
            kids = kids.view(-1, cfg.branching)
            next_id += kids.numel()
            self.children[frontier] = kids
            self.parent[kids] = frontier[:, None].expand_as(kids)
            share = torch.rand(kids.shape, generator=gen) + 0.5
            self.child_cum[frontier] = cfg.child_fire * (share / share.sum(-1, True)).cumsum(-1)
            self.levels.append(frontier)
            frontier = kids.flatten()
        self.probs: Float[Tensor, " N"] = self.base_probs.clone()
        """Marginal firing probability of every feature."""
        for frontier in self.levels:
            cond = torch.diff(self.child_cum[frontier], prepend=self.child_cum.new_zeros(
                frontier.numel(), 1), dim=-1)  # fmt: skip
            self.probs[self.children[frontier]] = self.probs[frontier][:, None] * cond
        r = cfg.correlation_rank
        self.factor: Int[Tensor, " N"] = torch.randint(max(r, 1), (n,), generator=gen)
        self.loading: Float[Tensor, " N"] = (
            cfg.correlation_scale * torch.randn(n, generator=gen).sign()
        )
        self.boost = 4.0 if r else 1.0
        self.mean_magnitude: Float[Tensor, " N"] = cfg.magnitude_mean_low + (
            cfg.magnitude_mean_high - cfg.magnitude_mean_low
        ) * torch.rand(n, generator=gen)
        self.features: Float[Tensor, "N D"] = nearly_orthogonal(
            n, cfg.d_in, cfg.orthogonalize_steps, gen
        )
        self.bias: Float[Tensor, " D"] = torch.randn(cfg.d_in, generator=gen)
        self.bias *= cfg.bias_norm / self.bias.norm().clamp_min(1e-12)

    @property
    def true_l0(self) -> float:
        """Expected number of active true features per activation."""
        return float(self.probs.sum())

    def held_out(self, offset: int, n_batches: int | None = None) -> RealisticActivations:
        """The same truth, its batches drawn from seeds starting at `offset` (no rebuilding)."""
        other = copy.copy(self)
        other.offset, other.n_batches, other.position = offset, n_batches, 0
        return other

    def top_l0(self, n: int) -> float:
        """Expected active features per activation among the n most frequent ones."""
        return float(self.probs.topk(min(n, self.probs.numel())).values.sum())

    def parent_child_pairs(self) -> Int[Tensor, "P 2"]:
        """Every (parent, child) feature pair of the hierarchies."""
        child = (self.parent >= 0).nonzero().squeeze(-1)
        return torch.stack([self.parent[child], child], dim=-1)

    def sample(self, index: int) -> GroundTruthBatch:
        """Batch `index` with its true events (deterministic)."""
        cfg, B = self.cfg, self.batch_size
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.offset + index + 1)
        rows, feats = _geometric_firings(self.base_probs * self.boost, B, gen)
        if cfg.correlation_rank:
            z = torch.randn(B, cfg.correlation_rank, generator=gen)
            logit = self.loading[feats] * z[rows, self.factor[feats]] - cfg.correlation_scale**2 / 2
            accept = torch.rand(rows.numel(), generator=gen) < logit.exp() / self.boost
            rows, feats = rows[accept], feats[accept]
        mags = self._magnitudes(feats, gen)
        all_rows, all_feats, all_mags = [rows], [feats], [mags]
        for _ in self.levels:
            u = torch.rand(rows.numel(), generator=gen)
            slot = (u[:, None] >= self.child_cum[feats]).sum(-1)
            has = (self.children[feats, 0] >= 0) & (slot < cfg.branching)
            kids = self.children[feats[has], slot[has]]
            scale = mags[has] / self.mean_magnitude[feats[has]]
            rows, feats, mags = rows[has], kids, self._magnitudes(kids, gen) * scale
            all_rows.append(rows)
            all_feats.append(feats)
            all_mags.append(mags)
        rows, feats, mags = torch.cat(all_rows), torch.cat(all_feats), torch.cat(all_mags)
        order = rows.argsort()
        rows, feats, mags = rows[order], feats[order], mags[order]
        offsets = torch.searchsorted(rows, torch.arange(B))
        x = torch.nn.functional.embedding_bag(
            feats, self.features, offsets, mode="sum", per_sample_weights=mags
        )
        x += self.bias
        if cfg.noise > 0:
            x += cfg.noise * torch.randn(x.shape, generator=gen)
        return GroundTruthBatch(x, rows, feats, mags)

    def _magnitudes(self, feats: Tensor, gen: torch.Generator) -> Tensor:
        mean = self.mean_magnitude[feats]
        eps = torch.randn(feats.numel(), generator=gen)
        return (mean * (1 + self.cfg.magnitude_cv * eps)).clamp_min(0.1 * mean)

    def batch(self, index: int) -> Float[Tensor, "B D"]:
        return self.sample(index).x


@torch.no_grad()
def nearly_orthogonal(n: int, d: int, steps: int, gen: torch.Generator) -> Float[Tensor, "N D"]:
    """n unit vectors in d < n dimensions: random, then `steps` gradient steps on the squared
    excess of every |cosine| over the typical random one, 1/sqrt(d)."""
    g = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)
    level = d**-0.5
    for _ in range(steps):
        cos = g @ g.T
        cos.fill_diagonal_(0)
        excess = torch.sign(cos) * (cos.abs() - level).clamp_min(0)
        g -= 0.5 * (excess @ g) / (excess.abs().sum(-1, keepdim=True).clamp_min(1))
        g = torch.nn.functional.normalize(g, dim=-1)
    return g
