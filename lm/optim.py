"""Optimizers of `sae train-lm` (lm/train.py), registered by name.

`adamw`: AdamW on every parameter, decoupled weight decay on matrices.

`muon`: Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) on the hidden
matrices of the transformer block, AdamW on the embeddings, the unembedding and the vectors,
as Muon's authors prescribe. Muon replaces a matrix's momentum by its nearest
semi-orthogonal matrix (a quintic Newton-Schulz iteration), so that every direction of the
update moves at the same rate. Its step is rescaled to the RMS of an AdamW step
(0.2 * sqrt(max(fan_in, fan_out)), Liu et al. 2025, "Muon is Scalable for LLM Training"), so
both halves share one learning rate, schedule and weight decay. What it gains on the
bundled model is in the README ("The bundled model").

`torch.optim.Muon` exists, but runs Newton-Schulz in bf16 whatever the device, which a CPU
without AVX512-BF16 emulates at many times the cost (benchmarks/bench_train_lm.py times
both); here the iteration runs in float32 unless the device has native bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from jaxtyping import Float

# Keller Jordan's coefficients: the quintic with the steepest slope at zero that still keeps
# singular values in about [0.7, 1.2] after five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

Named = list[tuple[str, torch.nn.Parameter]]


def orthogonalize(
    g_AB: Float[torch.Tensor, "A B"], steps: int = 5, dtype: torch.dtype = torch.float32
) -> Float[torch.Tensor, "A B"]:
    """Approximately U V^T of g = U S V^T by Newton-Schulz, in `dtype`."""
    a, b, c = NS_COEFFICIENTS
    x = g_AB.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / (x.norm() + 1e-7)  # Frobenius norm >= spectral norm: singular values now <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(g_AB.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups with `muon=True`, AdamW on the others; one `lr` for both."""

    def __init__(
        self,
        groups: list[dict[str, Any]],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        momentum: float = 0.95,
        ns_dtype: torch.dtype = torch.float32,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=1e-8, weight_decay=0.0, muon=False)
        super().__init__(groups, defaults)
        self.momentum = momentum
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                if group["muon"]:
                    self._muon(p, group["lr"])
                else:
                    self._adamw(p, group)
        return loss

    def _muon(self, p: torch.Tensor, lr: float) -> None:
        grad, state = p.grad, self.state[p]
        assert grad is not None
        if not state:
            state["momentum"] = torch.zeros_like(p)
        buf = state["momentum"]
        buf.lerp_(grad, 1 - self.momentum)
        nesterov = grad.lerp(buf, self.momentum)
        scale = 0.2 * max(p.shape) ** 0.5
        p.add_(orthogonalize(nesterov, dtype=self.ns_dtype), alpha=-lr * scale)

    def _adamw(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        correction1 = 1 - beta1 ** state["step"]
        correction2 = 1 - beta2 ** state["step"]
        denom = (state["exp_avg_sq"] / correction2).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / correction1)


def _adamw(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    decay, no_decay = _split(model.named_parameters(), lambda name, p: p.dim() >= 2)
    groups = [
        {"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _muon(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    from lm.config import native_bf16

    hidden, rest = _split(model.named_parameters(), is_hidden_matrix)
    decay, no_decay = _split(rest, lambda name, p: p.dim() >= 2)
    groups = [
        {"params": [p for _, p in hidden], "weight_decay": cfg.weight_decay, "muon": True},
        {"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    ns_dtype = torch.bfloat16 if native_bf16(cfg.device) else torch.float32
    return MuonAdamW(groups, lr=cfg.lr, ns_dtype=ns_dtype)


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """A matrix of a transformer block (GPT-2's `transformer.h.<i>.*`): what Muon takes.
    Embeddings and the unembedding are lookups and a classifier, whose rows move
    independently; Muon's authors keep them on AdamW."""
    return p.dim() == 2 and ".h." in f".{name}"


def _split(
    named: Iterable[tuple[str, torch.nn.Parameter]],
    test: Callable[[str, torch.nn.Parameter], bool],
) -> tuple[Named, Named]:
    yes: Named = []
    no: Named = []
    for name, p in named:
        (yes if test(name, p) else no).append((name, p))
    return yes, no


class OptimizerSpec(NamedTuple):
    """A registered optimizer: how to build it, and how the model card names it."""

    build: Callable[[torch.nn.Module, Any], torch.optim.Optimizer]
    description: str


OPTIMIZERS = {
    "adamw": OptimizerSpec(_adamw, "AdamW"),
    "muon": OptimizerSpec(
        _muon, "Muon on the block's matrices and AdamW on the rest (lm/optim.py)"
    ),
}


def make_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, over all of `model`'s parameters."""
    return OPTIMIZERS[cfg.optimizer].build(model, cfg)
