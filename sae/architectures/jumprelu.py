"""JumpReLU dictionary, Gemma Scope form (Rajamanoharan et al. 2024; Lieberum et al. 2024).

f = ReLU(pre) * (pre > threshold),  pre = W_enc^T x + b_enc (Gemma Scope does not subtract
b_dec from the input; cfg.apply_b_dec_to_input says which), x_hat = f W_dec + b_dec.
The straight-through estimators that train `threshold` live in training/objectives.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from sae.base import Dictionary, register
from sae.sparse_grad import ActiveCodes, codes_from_mask


@register("jumprelu")
class JumpReluDictionary(Dictionary):
    threshold: torch.nn.Parameter
    """Per-feature threshold [d_sae]: a feature fires only when its pre-activation exceeds it."""

    def extra_parameters(self) -> dict[str, tuple[int, ...]]:
        return {"threshold": (self.cfg.d_sae,)}

    def activation(self, pre_acts: Float[Tensor, "B F"]) -> Float[Tensor, "B F"]:
        # The ReLU matters only for negative thresholds (a threshold never crosses below 0 in
        # Gemma Scope's training, but foreign files may hold any value): we match their code.
        return torch.relu(pre_acts) * (pre_acts > self.threshold).to(pre_acts.dtype)

    def active_codes(self, pre_acts: Float[Tensor, "B F"]) -> ActiveCodes | None:
        # The threshold gets no gradient here (a comparison): its estimators are in training/.
        return codes_from_mask((pre_acts > self.threshold) & (pre_acts > 0))
