"""Matryoshka BatchTopK + AuxK (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning
Multi-Level Features with Matryoshka Sparse Autoencoders").

One encoding; the loss sums the reconstruction error of every nested prefix of the latents (the
paper's eq. 4), b_dec included in every prefix. As in SAELens's trainer, each prefix of width m
is its own BatchTopK: the k*B largest activations among its m latents, so the first m latents
must reconstruct x with k codes a sample on their own:

    loss = sum_m FVU(x, BatchTopK_k(f[:, :m]) W_dec[:m] + b_dec) + alpha * AuxK,  m in widths.

The last prefix is the whole dictionary: its codes are the dictionary's output, and the threshold
and AuxK use them. Early latents therefore learn general (parent) features and cannot let a
child's latent absorb them, which is what resists feature absorption. (Reusing the whole
dictionary's codes for the inner prefixes instead, so that an inner prefix keeps only the codes
that won the global ranking, recovered the true features worse on the realistic synthetic
benchmark: README.) The prefixes share the encoder pass; each decodes only its kept codes, O(B k
D), and the encoder's gradients flow through the kept codes only, as in sae/sparse_grad.py. A
batch-wide top-kB ranks only the activations above a cutoff below the running threshold
(`batch_topk`, exact, with a full ranking as the fallback).
Saved for inference, like `batchtopk`, as a `jumprelu` with the learned threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae.architectures.batchtopk import BatchTopKDictionary
from sae.base import Dictionary, ForwardOutput
from sae.sparse_grad import codes_from_pairs, decode_active, gather_pre_acts
from training.objectives.base import LossOutput, StepContext, register_objective
from training.objectives.batchtopk import BatchTopK
from training.objectives.topk_auxk import auxk_loss

if TYPE_CHECKING:
    from training.config import ObjectiveConfig


def prefix_widths(fractions: tuple[float, ...], d_sae: int) -> list[int]:
    """Prefix widths in latents from fractions of d_sae: increasing, distinct, ending at d_sae."""
    widths = sorted({max(1, min(d_sae, round(f * d_sae))) for f in fractions} | {d_sae})
    return widths


def batch_topk(
    pre: Float[Tensor, "B F"], k: int, cutoff: float
) -> tuple[Int[Tensor, " N"], Int[Tensor, " N"]]:
    """(row, latent) of the k*B largest ReLU(pre) of the batch, sorted by row then latent: the
    selection of BatchTopKDictionary.activation. When at least k*B values exceed `cutoff` > 0
    the largest are among them, so only those are ranked (a compare and a small top-k instead
    of a top-kB over all B*F values); otherwise, or with no cutoff yet, the whole batch is."""
    B, F_ = pre.shape
    n_keep = min(k * B, pre.numel())
    if cutoff > 0:  # above a positive cutoff, ReLU is the identity
        flat = pre.flatten()
        candidates = (flat > cutoff).nonzero().squeeze(-1)  # in row-major order
        if candidates.numel() >= n_keep:
            _, pos = flat[candidates].topk(n_keep, sorted=False)
            keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=pre.device)
            idx = candidates[keep.index_fill_(0, pos, True)]
            return idx // F_, idx % F_
    idx = torch.relu(pre).flatten().topk(n_keep, sorted=False).indices.sort().values
    return idx // F_, idx % F_


@register_objective("matryoshka_batchtopk")
class MatryoshkaBatchTopK(BatchTopK):
    architecture = "batchtopk"

    def __init__(self, cfg: ObjectiveConfig, d_in: int, d_sae: int) -> None:
        super().__init__(cfg, d_in, d_sae)
        self._kept: Tensor | None = None
        """The last step's kept activations (what the threshold estimate needs)."""

    def widths(self) -> list[int]:
        return prefix_widths(self.cfg.matryoshka_prefixes, self.d_sae)

    def loss(self, d: Dictionary, x: Float[Tensor, "B D"], ctx: StepContext) -> LossOutput:
        assert self.cfg.k is not None
        pre = d.pre_activations(x)
        B, F_ = pre.shape
        # Below the running threshold (the smallest kept activation, averaged over batches)
        # with a margin: almost always more than k*B candidates, so the fast path applies.
        threshold = getattr(d, "threshold", None)
        cutoff = 0.75 * float(threshold) if isinstance(threshold, Tensor) else 0.0
        ranked = pre.detach()
        if d.sparse_grad:  # encoder gradients through the kept codes only (sae/sparse_grad.py)
            pre = ranked
        total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        widths = self.widths()
        errors = []
        for width in widths:  # the last is the whole dictionary
            rows, cols = batch_topk(ranked[:, :width], self.cfg.k, cutoff)
            codes = codes_from_pairs(rows, cols, B, F_)
            values = torch.relu(gather_pre_acts(d, x, pre, codes))
            x_hat = decode_active(values, codes, d.W_dec) + d.b_dec
            errors.append((x_hat - x).pow(2).sum() / total)
        self._kept = values.detach()
        f = ranked.new_zeros(ranked.shape).index_put_((codes.rows, codes.cols), self._kept)
        out = ForwardOutput(x_hat=x_hat, feature_acts=f, pre_acts=pre, active=codes)
        per_prefix = torch.stack(errors)
        loss = per_prefix.sum()
        parts = {"fvu": per_prefix[-1].detach(), "fvu_prefix_sum": loss.detach()}
        for width, value in zip(widths[:-1], per_prefix[:-1], strict=True):
            parts[f"fvu_prefix_{width}"] = value.detach()
        if self.cfg.auxk_coefficient > 0:
            dead = ctx.tokens_since_fired >= self.cfg.dead_tokens
            aux = auxk_loss(d, x, out, dead, self.auxk_k())
            loss = loss + self.cfg.auxk_coefficient * aux
            parts["auxk"] = aux.detach()
        return LossOutput(loss, out, parts)

    def after_optimizer_step(self, d: Dictionary, out: ForwardOutput) -> None:
        # BatchTopK's threshold update without a pass over the [B, F] codes: the kept values.
        super(BatchTopK, self).after_optimizer_step(d, out)  # the decoder constraint
        assert isinstance(d, BatchTopKDictionary)
        kept = out.feature_acts if self._kept is None else self._kept
        d.update_threshold(kept, lr=self.cfg.threshold_lr)

    def finalize(self, d: Dictionary) -> Dictionary:
        assert isinstance(d, BatchTopKDictionary)
        out = d.to_inference()
        out.cfg.provenance = {
            **out.cfg.provenance,
            "trained_as": self.name,
            "matryoshka_prefixes": self.widths(),
        }
        return out
