"""Matryoshka BatchTopK + AuxK (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning
Multi-Level Features with Matryoshka Sparse Autoencoders").

One BatchTopK encoding over the whole dictionary; the loss averages the reconstruction error
of every nested prefix of the latents, so the first m latents must reconstruct x on their own:

    loss = mean_m FVU(x, f[:, :m] W_dec[:m] + b_dec) + alpha * AuxK,   m in prefix widths.

Early latents therefore learn general (parent) features and cannot let a child's latent absorb
them, which is what resists feature absorption. The prefixes share one encoding and one sparse
decode: each kept activation is decoded once into the bucket of the first prefix containing it,
and the prefix reconstructions are the cumulative sums of the buckets, O(B k D) in all. The
batch-wide top-kB ranks only the activations above a cutoff below the running threshold
(`batch_topk`, exact, with a full ranking as the fallback).
Saved for inference, like `batchtopk`, as a `jumprelu` with the learned threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def batch_topk(
    pre: Float[Tensor, "B F"], k: int, cutoff: float
) -> tuple[Float[Tensor, " N"], Int[Tensor, " N"], Int[Tensor, " N"]]:
    """The k*B largest ReLU(pre) of the batch as (value, row, latent), the selection of
    BatchTopKDictionary.activation. When at least k*B values exceed `cutoff` > 0 the largest
    are among them, so only those are ranked (a compare and a small top-k instead of a top-kB
    over all B*F values); otherwise, or with no cutoff yet, the whole batch is ranked."""
    B, F_ = pre.shape
    flat = torch.relu(pre).flatten()
    n_keep = min(k * B, flat.numel())
    if cutoff > 0:
        candidates = (flat > cutoff).nonzero().squeeze(-1)
        if candidates.numel() >= n_keep:
            acts, pos = flat[candidates].topk(n_keep, sorted=False)
            idx = candidates[pos]
            return acts, idx // F_, idx % F_
    acts, idx = flat.topk(n_keep, sorted=False)
    return acts, idx // F_, idx % F_


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
    key = bucket * batch + rows
    order = key.argsort()
    offsets = torch.searchsorted(key[order], torch.arange(len(widths) * batch, device=key.device))
    # embedding_bag gathers only the kept decoder rows, as Dictionary.decode_sparse does.
    buckets = F.embedding_bag(
        cols[order], d.W_dec, offsets, mode="sum", per_sample_weights=acts[order].to(d.W_dec.dtype)
    )
    parts = list(buckets.view(len(widths), batch, d.d_in).unbind())
    for i in range(1, len(parts)):  # a running sum; cumsum over a short leading dim is slow
        parts[i] = parts[i - 1] + parts[i]
    return torch.stack(parts) + d.b_dec


@register_objective("matryoshka_batchtopk")
class MatryoshkaBatchTopK(BatchTopK):
    architecture = "batchtopk"

    def widths(self) -> list[int]:
        return prefix_widths(self.cfg.matryoshka_prefixes, self.d_sae)

    def loss(self, d: Dictionary, x: Float[Tensor, "B D"], ctx: StepContext) -> LossOutput:
        assert self.cfg.k is not None
        pre = d.pre_activations(x)
        B = pre.shape[0]
        # Below the running threshold (the smallest kept activation, averaged over batches)
        # with a margin: almost always more than k*B candidates, so the fast path applies.
        threshold = getattr(d, "threshold", None)
        cutoff = 0.75 * float(threshold) if isinstance(threshold, Tensor) else 0.0
        acts, rows, cols = batch_topk(pre, self.cfg.k, cutoff)
        widths = self.widths()
        x_hats = prefix_reconstructions(d, acts, rows, cols, B, widths)
        f = torch.zeros_like(pre).index_put_((rows, cols), acts.detach())
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
