"""ReLU + L1, the 2023 form (Bricken et al., "Towards Monosemanticity").

loss = ||x - x_hat||^2 + l1 * sum_i |f_i|, with decoder rows held at unit norm (renormalised
after each step, the gradient parallel to each row removed before it) so the L1 penalty cannot
be dodged by shrinking codes and growing rows.
"""

from __future__ import annotations

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


@register_objective("relu_l1")
class ReluL1(Objective):
    architecture = "relu"
    sparsity_penalty = "l1"
    resamples = True
    unit_norm_decoder = True

    def encoder_init_scale(self) -> float:
        # With unit decoder rows and W_enc = W_dec^T, pre-activations start at about the input's
        # per-direction scale and half the features fire; Adam then needs thousands of steps of
        # size lr to move b_enc far enough to sparsify. Starting the encoder at
        # decoder_init_norm (0.1, SAELens's default) makes short runs converge.
        return self.cfg.decoder_init_norm

    def loss(
        self, d: Dictionary, x: Float[Tensor, "B D"], y: Float[Tensor, "B O"], ctx: StepContext
    ) -> LossOutput:
        out = d(x)
        l1 = out.feature_acts.sum(-1).mean()  # ReLU codes are >= 0: |f| = f, no abs pass
        return penalized_sse(y, out, l1, ctx.sparsity_coefficient, "l1")
