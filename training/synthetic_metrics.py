"""Ground-truth metrics of a dictionary on `RealisticActivations` (training/synthetic.py),
measured on held-out batches whose true active features are known.

MCC, F1, precision, recall and uniqueness follow SynthSAEBench's definitions (Chanin &
Garriga-Alonso 2026, arXiv:2602.14687; SAELens's `sae_lens/synthetic/evals.py`), so numbers are
comparable with its tables:
- MCC: the mean |cosine| of decoder rows and true directions under the optimal one-to-one
  matching (Hungarian, scipy's linear_sum_assignment; O'Neill et al. 2025).
- Per latent, as a binary detector of its best-matching true feature (highest |cosine| of
  decoder row and true direction, not co-activation): precision = P(feature active | latent
  fires), recall = P(latent fires | feature active), F1; each averaged over all latents, a
  latent that never fires scoring 0, and two latents matched to one feature each counted.
- Uniqueness: distinct best-matching true features per latent.
- Absorption (Chanin et al. 2024, "A is for Absorption"), measured directly: over samples where
  a parent and one of its children are both active, how often the parent's latent (the one
  closest to its direction) stays silent while the child's latent fires.
- Explained variance, shrinkage (norm of the reconstruction over the norm of the input, both
  without the true bias; below 1 means codes shrink), L0 and dead latents (never fired).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from sae.base import Dictionary
from training.synthetic import GroundTruthBatch, RealisticActivations


@dataclass
class GroundTruthMetrics:
    """A dictionary scored against the true features."""

    mcc: float
    """Mean |cosine| of the optimal one-to-one matching of decoder rows to true features."""
    f1: float
    """Mean per-latent F1 as a detector of its best-matching true feature."""
    precision: float
    """Mean per-latent precision (latents that never fire count 0)."""
    recall: float
    """Mean per-latent recall."""
    uniqueness: float
    """Distinct best-matching true features / latents (1: no two latents share a feature)."""
    absorption: float
    """P(parent's latent silent and child's latent fires | parent and child active)."""
    explained_variance: float
    """1 - FVU of the reconstruction on the held-out samples."""
    shrinkage: float
    """sum ||x_hat - bias|| / sum ||x - bias|| (1: no shrinkage)."""
    l0: float
    """Mean latents firing per sample."""
    dead_fraction: float
    """Latents that never fired on the held-out samples."""

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def matched_cosines(
    W_dec: Float[Tensor, "F D"], features: Float[Tensor, "N D"]
) -> tuple[Float[Tensor, "F N"], float]:
    """|Cosines| of every decoder row with every true direction, and the Hungarian MCC."""
    cos = F.normalize(W_dec.float().cpu(), dim=-1) @ F.normalize(features.float(), dim=-1).T
    cos = cos.abs()  # a direction and its negative are the same feature (SynthSAEBench)
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    return cos, float(cos[torch.as_tensor(rows), torch.as_tensor(cols)].mean())


@torch.no_grad()
def ground_truth_metrics(
    d: Dictionary,
    truth: RealisticActivations,
    batches: Iterable[GroundTruthBatch],
    input_scale: float = 1.0,
) -> GroundTruthMetrics:
    """Score `d` on held-out `batches` (from `truth.sample`); `input_scale` multiplies inputs
    for a dictionary still in its training space (1 for a saved dictionary)."""
    cos, mcc = matched_cosines(d.W_dec.detach(), truth.features)
    best = cos.argmax(1)  # [F] each latent's true feature
    latent_of = cos.argmax(0)  # [N] each true feature's closest latent
    pairs = truth.parent_child_pairs()
    parent_latent, child_latent = latent_of[pairs[:, 0]], latent_of[pairs[:, 1]]
    n_latents, n_true = d.d_sae, truth.features.shape[0]
    fired = torch.zeros(n_latents)
    hits = torch.zeros(n_latents)
    true_count = torch.zeros(n_true)
    both = absorbed = 0.0
    err = sq = recon_norm = input_norm = 0.0
    sum_x = torch.zeros(d.d_in)
    n = 0
    for b in batches:
        B = b.x.shape[0]
        active = torch.zeros(B, n_true, dtype=torch.bool)
        active[b.rows, b.features] = True
        x = b.x.to(d.device, d.dtype)
        out = d(x * input_scale)
        x_hat = (out.x_hat / input_scale).float().cpu()
        fires = (out.feature_acts != 0).cpu()
        fired += fires.sum(0)
        hits += (fires & active[:, best]).sum(0)
        true_count += active.sum(0)
        pc = active[:, pairs[:, 0]] & active[:, pairs[:, 1]]
        both += float(pc.sum())
        absorbed += float((pc & ~fires[:, parent_latent] & fires[:, child_latent]).sum())
        xc = b.x.float()
        err += float((x_hat - xc).pow(2).sum())
        sq += float(xc.pow(2).sum())
        sum_x += xc.sum(0)
        recon_norm += float((x_hat - truth.bias).norm(dim=-1).sum())
        input_norm += float((xc - truth.bias).norm(dim=-1).sum())
        n += B
    if n == 0:
        raise ValueError("ground_truth_metrics() got no batches")
    precision = hits / fired.clamp_min(1)
    recall = hits / true_count[best].clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    total = sq - float(sum_x.pow(2).sum()) / n
    return GroundTruthMetrics(
        mcc=mcc,
        f1=float(f1.mean()),
        precision=float(precision.mean()),
        recall=float(recall.mean()),
        uniqueness=best.unique().numel() / n_latents,
        absorption=absorbed / max(both, 1.0),
        explained_variance=1.0 - err / max(total, 1e-12),
        shrinkage=recon_norm / max(input_norm, 1e-12),
        l0=float(fired.sum()) / n,
        dead_fraction=float((fired == 0).float().mean()),
    )
