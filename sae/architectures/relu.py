"""ReLU dictionary (Anthropic 2023, "Towards Monosemanticity"; also the April-2024 update).

f = ReLU(W_enc^T (x - b_dec) + b_enc),  x_hat = f W_dec + b_dec.
The 2023 form keeps decoder rows at unit norm; the 2024 form leaves them free and weights
the L1 penalty by their norms (the training objective decides; inference is identical).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from sae.base import Dictionary, register
from sae.sparse_grad import ActiveCodes, codes_from_mask


@register("relu")
class ReluDictionary(Dictionary):
    def activation(self, pre_acts: Float[Tensor, "B F"]) -> Float[Tensor, "B F"]:
        return torch.relu(pre_acts)

    def active_codes(self, pre_acts: Float[Tensor, "B F"]) -> ActiveCodes | None:
        return codes_from_mask(pre_acts > 0)
