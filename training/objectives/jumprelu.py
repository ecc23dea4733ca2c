"""JumpReLU + L0 (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

f = pre * H(pre - theta), loss = ||x - x_hat||^2 + l0_coefficient * ||f||_0. The Heaviside
step has no useful gradient, so theta learns through straight-through estimators with a
rectangle kernel K of width `bandwidth` eps:
    d f / d theta  = -(theta / eps) K((pre - theta) / eps)
    d H / d theta  = -(1 / eps)     K((pre - theta) / eps)
Inputs are not shifted by b_dec (Gemma Scope); decoder rows stay unit norm, since the L0
penalty alone would not stop codes shrinking while rows grow.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from sae.base import Dictionary, ForwardOutput
from training.objectives.base import (
    LossOutput,
    Objective,
    StepContext,
    penalized_sse,
    register_objective,
)


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > theta).to(pre.dtype)
        grad_theta = -(theta / eps) * _rectangle((pre - theta) / eps) * grad
        return grad_pre, grad_theta.sum(0), None


class StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = -(1.0 / eps) * _rectangle((pre - theta) / eps) * grad
        return torch.zeros_like(pre), grad_theta.sum(0), None


@register_objective("jumprelu")
class JumpReLU(Objective):
    architecture = "jumprelu"
    sparsity_penalty = "l0"
    unit_norm_decoder = True
    apply_b_dec_to_input = False

    @torch.no_grad()
    def init_weights(self, d: Dictionary, gen: torch.Generator) -> None:
        super().init_weights(d, gen)
        d.get_parameter("threshold").fill_(self.cfg.jumprelu_init_threshold)

    def loss(
        self, d: Dictionary, x: Float[Tensor, "B D"], y: Float[Tensor, "B O"], ctx: StepContext
    ) -> LossOutput:
        theta = d.get_parameter("threshold")
        eps = self.cfg.jumprelu_bandwidth
        pre = d.pre_activations(x)
        f = JumpReLUFn.apply(pre, theta, eps)
        out = d.with_skip(x, ForwardOutput(x_hat=d.decode(f), feature_acts=f, pre_acts=pre))
        l0 = StepFn.apply(pre, theta, eps).sum(-1).mean()
        return penalized_sse(y, out, l0, ctx.sparsity_coefficient, "l0_penalty")

    @torch.no_grad()
    def after_optimizer_step(self, d: Dictionary, out: ForwardOutput) -> None:
        super().after_optimizer_step(d, out)
        # A threshold at or below 0 would turn the unit into a plain ReLU; keep it positive.
        d.get_parameter("threshold").clamp_(min=1e-6)
