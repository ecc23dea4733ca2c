"""Matryoshka BatchTopK + AuxK (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning
Multi-Level Features with Matryoshka Sparse Autoencoders").

One BatchTopK encoding over the whole dictionary; the loss averages the reconstruction error
of every nested prefix of the latents, so the first m latents must reconstruct x on their own:

    loss = mean_m FVU(x, f[:, :m] W_dec[:m] + b_dec) + alpha * AuxK,   m in prefix widths.

Early latents therefore learn general (parent) features and cannot let a child's latent absorb
them, which is what resists feature absorption. The prefixes share one encoding and one sparse
decode: each kept activation is decoded once into the bucket of the first prefix containing it,
and the prefix reconstructions are the cumulative sums of the buckets, O(B k D) in all.
Saved for inference, like `batchtopk`, as a `jumprelu` with the learned threshold.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae.architectures.batchtopk import BatchTopKDictionary
from sae.base import Dictionary, ForwardOutput
from training.objectives.base import LossOutput, StepContext, register_objective
from training.objectives.batchtopk import BatchTopK
from training.objectives.topk_auxk import auxk_loss


def prefix_widths(fractions: tuple[float, ...], d_sae: int) -> list[int]:
    """Prefix widths in latents from fractions of d_sae: increasing, distinct, ending at d_sae."""
    widths = sorted({max(1, min(d_sae, round(f * d_sae))) for f in fractions} | {d_sae})
    return widths


def prefix_reconstructions(
    d: Dictionary,
    acts: Float[Tensor, " N"],
    rows: Int[Tensor, " N"],
    cols: Int[Tensor, " N"],
    batch: int,
    widths: list[int],
) -> Float[Tensor, "M B D"]:
    """x_hat of every prefix from the kept activations (value, row, latent), one decode each."""
    bounds = torch.tensor(widths[:-1], device=cols.device)
    bucket = torch.bucketize(cols, bounds, right=True)  # first prefix that contains the latent
    contrib = acts[:, None].to(d.W_dec.dtype) * d.W_dec[cols]
    buckets = torch.zeros(len(widths) * batch, d.d_in, device=acts.device, dtype=contrib.dtype)
    buckets = buckets.index_add(0, bucket * batch + rows, contrib)
    return buckets.view(len(widths), batch, d.d_in).cumsum(0) + d.b_dec


@register_objective("matryoshka_batchtopk")
class MatryoshkaBatchTopK(BatchTopK):
    architecture = "batchtopk"

    def widths(self) -> list[int]:
        return prefix_widths(self.cfg.matryoshka_prefixes, self.d_sae)

    def loss(self, d: Dictionary, x: Float[Tensor, "B D"], ctx: StepContext) -> LossOutput:
        assert self.cfg.k is not None
        pre = d.pre_activations(x)
        B, F = pre.shape
        flat = torch.relu(pre).flatten()
        acts, idx = flat.topk(min(self.cfg.k * B, flat.numel()), sorted=False)
        rows, cols = idx // F, idx % F
        widths = self.widths()
        x_hats = prefix_reconstructions(d, acts, rows, cols, B, widths)
        f = torch.zeros_like(flat).scatter(0, idx, acts.detach()).view(B, F)
        out = ForwardOutput(x_hat=x_hats[-1], feature_acts=f, pre_acts=pre)
        total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        per_prefix = (x_hats - x).pow(2).sum((1, 2)) / total
        loss = per_prefix.mean()
        parts = {"fvu": per_prefix[-1].detach(), "fvu_prefix_mean": loss.detach()}
        for width, value in zip(widths[:-1], per_prefix[:-1], strict=True):
            parts[f"fvu_prefix_{width}"] = value.detach()
        if self.cfg.auxk_coefficient > 0:
            dead = ctx.tokens_since_fired >= self.cfg.dead_tokens
            aux = auxk_loss(d, x, out, dead, self.auxk_k())
            loss = loss + self.cfg.auxk_coefficient * aux
            parts["auxk"] = aux.detach()
        return LossOutput(loss, out, parts)

    def finalize(self, d: Dictionary) -> Dictionary:
        assert isinstance(d, BatchTopKDictionary)
        out = d.to_inference()
        out.cfg.provenance = {
            **out.cfg.provenance,
            "trained_as": self.name,
            "matryoshka_prefixes": self.widths(),
        }
        return out
