"""ReLU + L1, the April 2024 form (Anthropic, "Training Sparse Autoencoders" update).

loss = ||x - x_hat||^2 + l1 * sum_i f_i ||W_dec_i||: the decoder is unconstrained and the
penalty weighs each code by its row norm instead. Rows start at norm 0.1 with W_enc = W_dec^T.
On save the norms are folded in (W_dec rows to unit norm, W_enc columns and b_enc scaled up),
which leaves every reconstruction unchanged and makes codes comparable across features.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from sae.base import Dictionary
from training.objectives.base import (
    LossOutput,
    Objective,
    StepContext,
    penalized_sse,
    register_objective,
)


@torch.no_grad()
def fold_decoder_norms_(d: Dictionary) -> None:
    """f_i' = n_i f_i and W_dec_i' = W_dec_i / n_i: same x_hat, unit decoder rows."""
    norms = d.W_dec.norm(dim=-1).clamp_min(1e-12)
    d.W_dec.div_(norms[:, None])
    d.W_enc.mul_(norms[None, :])
    d.b_enc.mul_(norms)


@register_objective("relu_l1_2024")
class ReluL12024(Objective):
    architecture = "relu"
    sparsity_penalty = "l1"
    unit_norm_decoder = False

    def decoder_row_norm(self) -> float:
        return self.cfg.decoder_init_norm

    def loss(
        self, d: Dictionary, x: Float[Tensor, "B D"], y: Float[Tensor, "B O"], ctx: StepContext
    ) -> LossOutput:
        out = d(x)
        l1 = (out.feature_acts * d.W_dec.norm(dim=-1)).sum(-1).mean()
        return penalized_sse(y, out, l1, ctx.sparsity_coefficient, "l1")

    def finalize(self, d: Dictionary) -> Dictionary:
        fold_decoder_norms_(d)
        return d
