"""TopK dictionary (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

f = TopK_k(ReLU(W_enc^T (x - b_dec) + b_enc)),  x_hat = f W_dec + b_dec.
Exactly k features per row (fewer if fewer are positive); the AuxK loss for dead latents
lives in training/objectives and reads `pre_acts` from `forward`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from sae.base import Dictionary, EncoderOutput, ForwardOutput, register
from sae.sparse_grad import MAX_ACTIVE_FRACTION, ActiveCodes, codes_from_indices


@register("topk")
class TopKDictionary(Dictionary):
    needs_k: ClassVar[bool] = True
    sparse_decode: bool = True
    """The dense forward decodes through decode_sparse (O(B K D)); False: f W_dec."""

    @property
    def k(self) -> int:
        assert self.cfg.k is not None  # checked in __init__
        return self.cfg.k

    def _topk(self, pre_acts: Float[Tensor, "B F"]) -> EncoderOutput:
        # ReLU before TopK, as in Gao et al. and sparsify: a negative pre-activation never fires
        # even when fewer than k features are positive.
        acts, idx = torch.relu(pre_acts).topk(self.k, dim=-1, sorted=True)
        return EncoderOutput(acts, idx)

    def activation(self, pre_acts: Float[Tensor, "B F"]) -> Float[Tensor, "B F"]:
        acts, idx = self._topk(pre_acts)
        return torch.zeros_like(pre_acts).scatter(-1, idx, acts)

    def encode_sparse(self, x: Float[Tensor, "B D"], k: int | None = None) -> EncoderOutput:
        """The exact top-k codes of each row, largest first (k may be lowered, not raised)."""
        acts, idx = self._topk(self.pre_activations(x))
        if k is not None and k < self.k:
            acts, idx = acts[..., :k], idx[..., :k]
        return EncoderOutput(acts, idx)

    def active_codes(self, pre_acts: Float[Tensor, "B F"]) -> ActiveCodes | None:
        if self.k > MAX_ACTIVE_FRACTION * self.d_sae:
            return None
        # The k largest pre-activations without the [B, F] relu pass: where fewer than k are
        # positive the extra picks differ from the reference's, but their codes are 0 in both.
        return codes_from_indices(pre_acts.topk(self.k, dim=-1, sorted=False).indices, self.d_sae)

    def dense_output(self, pre: Float[Tensor, "B F"]) -> ForwardOutput:
        acts, idx = self._topk(pre)
        f = torch.zeros_like(pre).scatter(-1, idx, acts)
        x_hat = self.decode_sparse(acts, idx) if self.sparse_decode else self.decode(f)
        return ForwardOutput(x_hat=x_hat, feature_acts=f, pre_acts=pre)
