"""BatchTopK dictionary (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training: keep the k*B largest ReLU(pre) over the whole batch of B rows (so k is the mean L0,
and easy tokens use fewer features than hard ones). Inference cannot depend on the batch, so
a scalar `threshold` is estimated during training (a running average of the smallest kept
activation, updated by the trainer via `update_threshold`) and the dictionary is saved as a
`jumprelu` with that threshold on every feature: f = ReLU(pre) * (pre > threshold).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae.base import Dictionary, DictionaryConfig, EncoderOutput, register
from sae.sparse_grad import MAX_ACTIVE_FRACTION, ActiveCodes, codes_from_pairs

RANKING_MARGIN = 0.75
"""A ranking cutoff is this fraction of last step's k*B-th activation: far enough below it that
almost always more than k*B activations of the next batch lie above, so `batch_topk` ranks only
those."""


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


@register("batchtopk")
class BatchTopKDictionary(Dictionary):
    needs_k: ClassVar[bool] = True
    threshold: Tensor
    """Scalar inference threshold; negative until the first `update_threshold`."""

    def __init__(self, cfg: DictionaryConfig) -> None:
        super().__init__(cfg)
        # A buffer, not a Parameter: the optimizer must not touch it, but it is saved.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def _batch_topk(self, pre_acts: Float[Tensor, "B F"]) -> tuple[Tensor, Tensor]:
        """The kept relu(pre) values and their indices into the flattened batch."""
        assert self.cfg.k is not None  # checked in __init__
        flat = torch.relu(pre_acts).flatten()
        n_rows = flat.numel() // pre_acts.shape[-1]
        return flat.topk(min(self.cfg.k * n_rows, flat.numel()), sorted=False)

    def activation(self, pre_acts: Float[Tensor, "B F"]) -> Float[Tensor, "B F"]:
        acts, idx = self._batch_topk(pre_acts)
        f = torch.zeros(pre_acts.numel(), dtype=acts.dtype, device=acts.device)
        return f.scatter(-1, idx, acts).reshape(pre_acts.shape)

    def ranking_cutoff(self) -> float:
        """`batch_topk`'s cutoff: RANKING_MARGIN of the running threshold (0 before it is
        estimated)."""
        return max(RANKING_MARGIN * float(self.threshold), 0.0)

    def active_codes(self, pre_acts: Float[Tensor, "B F"]) -> ActiveCodes | None:
        assert self.cfg.k is not None
        if self.cfg.k > MAX_ACTIVE_FRACTION * self.d_sae:
            return None
        B, F_ = pre_acts.shape
        rows, cols = batch_topk(pre_acts, self.cfg.k, self.ranking_cutoff())
        return codes_from_pairs(rows, cols, B, F_)

    def encode_sparse(self, x: Float[Tensor, "B D"], k: int | None = None) -> EncoderOutput:
        """Active features of each row; rows differ in L0, so k defaults to the batch's max."""
        f = self.encode(x)
        if k is None:
            k = max(int((f != 0).sum(-1).max().item()), 1)
        acts, idx = f.topk(k, dim=-1, sorted=True)
        return EncoderOutput(acts, idx)

    @torch.no_grad()
    def update_threshold(self, feature_acts: Float[Tensor, "B F"], lr: float = 0.01) -> None:
        """Move the threshold toward the smallest positive kept activation of this batch.

        An exponential moving average as in Bussmann et al.'s reference code (and SAELens's
        `topk_threshold_lr`); the first call sets it directly.
        """
        positive = feature_acts[feature_acts > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().to(self.threshold.dtype)
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest, lr)

    def to_inference(self) -> Dictionary:
        """The equivalent batch-independent `jumprelu` dictionary (what `save` writes)."""
        from sae.base import build

        if not bool(torch.isfinite(self.threshold)) or float(self.threshold) < 0:
            raise ValueError(
                "batchtopk threshold was never estimated (call update_threshold during training)"
            )
        # k moves to provenance: a jumprelu has no fixed k, and cfg.k would cap encode_sparse.
        cfg = DictionaryConfig(**{**self.cfg.to_json(), "architecture": "jumprelu", "k": None})
        cfg.provenance = {**cfg.provenance, "trained_as": "batchtopk", "batchtopk_k": self.cfg.k}
        out = build(cfg).to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            for name, param in self.named_parameters():  # W_enc ... b_dec, W_skip if any
                out.get_parameter(name).copy_(param)
            out.get_parameter("threshold").fill_(float(self.threshold))
        return out
