"""Matryoshka BatchTopK + AuxK (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning
Multi-Level Features with Matryoshka Sparse Autoencoders").

One encoding and one BatchTopK over the whole dictionary; the loss sums the reconstruction
error of every nested prefix of the latents (the paper's eq. 4), each prefix decoding the codes
that fall in it, b_dec included in every prefix:

    loss = sum_m FVU(x, f[:, :m] W_dec[:m] + b_dec) + L alpha AuxK,  m in widths,

with L the number of prefixes, so AuxK weighs against the sum of L errors as it does against
one in topk_auxk. Early latents must reconstruct x without the later ones, so they learn
general (parent) features and cannot let a child's latent absorb them, which is what resists
feature absorption. The codes are decoded once into per-row, per-prefix bags whose cumulative
sums are the prefix reconstructions; the last prefix is the whole dictionary, whose codes are
the dictionary's output and feed the threshold and AuxK.

With `matryoshka_prefix_codes="own"` (SAELens's trainer) each prefix of width m is its own
BatchTopK instead, the k*B largest activations among its m latents, so the first m latents
must reconstruct x with k codes a sample on their own: each prefix costs its own ranking,
gather and decode.

Every decode is of kept codes only, O(B k D), and the encoder's gradients flow through the kept
codes only, as in sae/sparse_grad.py. A batch-wide top-kB ranks only the activations above a
cutoff below the running threshold (`batch_topk`, exact, with a full ranking as the fallback).
Saved for inference, like `batchtopk`, as a `jumprelu` with the learned threshold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from sae.architectures.batchtopk import RANKING_MARGIN, BatchTopKDictionary, batch_topk
from sae.base import Dictionary, ForwardOutput
from sae.sparse_grad import ActiveCodes, codes_from_pairs, decode_active, gather_pre_acts
from training.objectives.base import LossOutput, StepContext, register_objective
from training.objectives.batchtopk import BatchTopK
from training.objectives.topk_auxk import auxk_loss

if TYPE_CHECKING:
    from training.config import ObjectiveConfig


def prefix_widths(fractions: tuple[float, ...], d_sae: int) -> list[int]:
    """Prefix widths in latents from fractions of d_sae: increasing, distinct, ending at d_sae."""
    widths = sorted({max(1, min(d_sae, round(f * d_sae))) for f in fractions} | {d_sae})
    return widths


def prefix_reconstructions(
    d: Dictionary,
    values: Float[Tensor, " N"],
    codes: ActiveCodes,
    widths: list[int],
) -> list[Float[Tensor, "B D"]]:
    """x_hat of every prefix from the kept codes (sorted by row, then latent): each code is
    decoded once into the bag (row, first prefix containing its latent), then the bags of a
    row are summed cumulatively. Within a row the codes are sorted by latent, hence by
    prefix, so the bags are already contiguous and the codes need no reordering; the bags
    reuse the codes' per-latent order for the backward pass."""
    batch, n_bags = codes.offsets.numel() - 1, len(widths)
    bounds = torch.tensor(widths[:-1], device=codes.cols.device)
    bag = codes.rows * n_bags + torch.bucketize(codes.cols, bounds, right=True)
    counts = torch.bincount(bag, minlength=batch * n_bags)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    bags = codes._replace(rows=bag, offsets=offsets)
    decoded = decode_active(values, bags, d.W_dec).view(batch, n_bags, d.d_out)
    prefixes = [decoded[:, 0] + d.b_dec]
    for i in range(1, n_bags):  # a running sum; cumsum over the short middle dim is slower
        prefixes.append(prefixes[-1] + decoded[:, i])
    return prefixes


@register_objective("matryoshka_batchtopk")
class MatryoshkaBatchTopK(BatchTopK):
    architecture = "batchtopk"

    def __init__(
        self, cfg: ObjectiveConfig, d_in: int, d_sae: int, d_out: int | None = None
    ) -> None:
        super().__init__(cfg, d_in, d_sae, d_out)
        self._kept: Tensor | None = None
        """The last step's kept activations (what the threshold estimate needs)."""
        self._prefix_kth: dict[int, float] = {}
        """Smallest activation each inner prefix kept last step: RANKING_MARGIN of it is the
        cutoff of the prefix's next ranking (exact either way; only speed depends on it)."""

    def widths(self) -> list[int]:
        return prefix_widths(self.cfg.matryoshka_prefixes, self.d_sae)

    def loss(
        self, d: Dictionary, x: Float[Tensor, "B D"], y: Float[Tensor, "B O"], ctx: StepContext
    ) -> LossOutput:
        assert self.cfg.k is not None
        pre = d.pre_activations(x)
        B, F_ = pre.shape
        # Below the running threshold: batch_topk's fast path. `d` may be the compiled module,
        # which forwards attributes to the dictionary but is no BatchTopKDictionary instance.
        cutoff = cast(BatchTopKDictionary, d).ranking_cutoff()
        ranked = pre.detach()
        if d.sparse_grad:  # encoder gradients through the kept codes only (sae/sparse_grad.py)
            pre = ranked
        widths = self.widths()
        if self.cfg.matryoshka_prefix_codes == "own":
            x_hats, codes, values = self._own_codes(d, x, pre, ranked, cutoff, widths)
        else:
            rows, cols = batch_topk(ranked, self.cfg.k, cutoff)
            codes = codes_from_pairs(rows, cols, B, F_)
            values = torch.relu(gather_pre_acts(d, x, pre, codes))
            x_hats = prefix_reconstructions(d, values, codes, widths)
        skip = d.skip_output(x)  # a skip transcoder's linear path belongs to every prefix
        if skip is not None:
            x_hats = [x_hat + skip for x_hat in x_hats]
        self._kept = values.detach()
        f = ranked.new_zeros(ranked.shape).index_put_((codes.rows, codes.cols), self._kept)
        out = ForwardOutput(x_hat=x_hats[-1], feature_acts=f, pre_acts=pre, active=codes)
        total = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
        errors = [F.mse_loss(x_hat, y, reduction="sum") / total for x_hat in x_hats]
        per_prefix = torch.stack(errors)
        loss = per_prefix.sum()
        parts = {"fvu": per_prefix[-1].detach(), "fvu_prefix_sum": loss.detach()}
        for width, value in zip(widths[:-1], per_prefix[:-1], strict=True):
            parts[f"fvu_prefix_{width}"] = value.detach()
        if self.cfg.auxk_coefficient > 0:
            dead = ctx.tokens_since_fired >= self.cfg.dead_tokens
            aux = auxk_loss(d, x, y, out, dead, self.auxk_k())
            # Weighed against the sum of len(widths) prefix errors as topk's against one.
            loss = loss + len(widths) * self.cfg.auxk_coefficient * aux
            parts["auxk"] = aux.detach()
        return LossOutput(loss, out, parts)

    def _own_codes(
        self,
        d: Dictionary,
        x: Tensor,
        pre: Tensor,
        ranked: Tensor,
        cutoff: float,
        widths: list[int],
    ) -> tuple[list[Tensor], ActiveCodes, Tensor]:
        """x_hat of every prefix from its own batch top-k; the last prefix's codes and values."""
        assert self.cfg.k is not None
        B, F_ = ranked.shape
        x_hats = []
        for width in widths:  # the last is the whole dictionary
            # An inner prefix ranks fewer activations, so its k*B-th value lies below the whole
            # dictionary's threshold: its own last one gives a cutoff that leaves about k*B
            # candidates, not a ranking of all B x width.
            below = cutoff if width == F_ else RANKING_MARGIN * self._prefix_kth.get(width, 0.0)
            rows, cols = batch_topk(ranked[:, :width], self.cfg.k, below)
            codes = codes_from_pairs(rows, cols, B, F_)
            values = torch.relu(gather_pre_acts(d, x, pre, codes))
            if width < F_ and values.numel():
                self._prefix_kth[width] = float(values.detach().min())
            x_hats.append(decode_active(values, codes, d.W_dec) + d.b_dec)
        return x_hats, codes, values

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
