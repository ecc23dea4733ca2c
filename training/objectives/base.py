"""What a training objective is: the loss, the weight constraints around the optimizer step,
the initialisation, and how the trained module becomes the saved dictionary.

One small file per objective, registered by name with `@register_objective`; the trainer
never branches on the objective's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from sae.base import Dictionary, DictionaryConfig, ForwardOutput, architecture_class
from sae.registry import register_class

if TYPE_CHECKING:
    from training.config import ObjectiveConfig

OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str) -> Callable[[type[Objective]], type[Objective]]:
    """Class decorator: make an objective selectable as `objective.name`."""
    return register_class(OBJECTIVES, name, kind="objective", attribute="name")


class LossOutput(NamedTuple):
    """One forward pass of the objective."""

    loss: Tensor
    """Scalar to minimise."""
    out: ForwardOutput
    """The dictionary's reconstruction, codes and pre-activations."""
    parts: dict[str, Tensor]
    """Detached named components for logging (e.g. mse, l1, auxk)."""


@dataclass
class StepContext:
    """Per-step facts the trainer owns and objectives read."""

    sparsity_coefficient: float
    """Current sparsity weight (after warm-up and the target-L0 controller)."""
    tokens_since_fired: Tensor
    """[F] tokens since each feature last fired (dead-latent detection for AuxK)."""


def sse(x: Float[Tensor, "B D"], x_hat: Float[Tensor, "B D"]) -> Tensor:
    """Squared reconstruction error summed over D, mean over the batch (Anthropic's form)."""
    return (x_hat - x).pow(2).sum(-1).mean()


def fvu(x: Float[Tensor, "B D"], x_hat: Float[Tensor, "B D"]) -> Tensor:
    """Fraction of variance unexplained in the batch (the scale-free loss of sparsify)."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x_hat - x).pow(2).sum() / total.clamp_min(1e-12)


def penalized_sse(
    y: Float[Tensor, "B D"], out: ForwardOutput, penalty: Tensor, coefficient: float, name: str
) -> LossOutput:
    """sse + coefficient * penalty (Anthropic's form), logging both parts as "recon" and `name`."""
    recon = sse(y, out.x_hat)
    parts = {"recon": recon.detach(), name: penalty.detach()}
    return LossOutput(recon + coefficient * penalty, out, parts)


@torch.no_grad()
def normalize_decoder_rows_(d: Dictionary) -> None:
    """Scale every decoder row to unit norm, in place (no [F, D] temporary)."""
    norms = torch.linalg.vector_norm(d.W_dec, dim=-1, keepdim=True)
    d.W_dec.div_(norms.clamp_min_(1e-12))


@torch.no_grad()
def remove_parallel_grad_(d: Dictionary) -> None:
    """Project out the gradient component along each decoder row (rows stay unit norm to first
    order; Towards Monosemanticity, Gao et al. 2024)."""
    if d.W_dec.grad is None:
        return
    W, grad = d.W_dec, d.W_dec.grad
    # g -= (g . w) w / |w|^2 row by row, with no [F, D] temporaries.
    sq_norms = torch.linalg.vecdot(W, W).clamp_min_(1e-24)
    parallel = torch.linalg.vecdot(grad, W).div_(sq_norms)
    grad.addcmul_(W, parallel.unsqueeze(-1), value=-1.0)


class Objective:
    """Base class; subclasses set the class attributes and override `loss`."""

    name: ClassVar[str] = ""
    architecture: ClassVar[str] = "relu"
    """Registered sae architecture built for training."""
    sparsity_penalty: ClassVar[Literal["l1", "l0", "none"]] = "none"
    """Which penalty l1_coefficient weighs (decides target-L0 steering)."""
    resamples: ClassVar[bool] = False
    """Resample dead features by default (the 2023 recipe of Towards Monosemanticity)."""
    unit_norm_decoder: ClassVar[bool] = True
    """Keep decoder rows at unit norm (and remove the gradient parallel to them)."""
    apply_b_dec_to_input: ClassVar[bool] = True
    """Subtract b_dec from inputs before encoding."""

    def __init__(
        self, cfg: ObjectiveConfig, d_in: int, d_sae: int, d_out: int | None = None
    ) -> None:
        self.cfg = cfg
        self.d_in = d_in
        self.d_sae = d_sae
        self.d_out = d_out
        """Width of a transcoder's target (None: a sparse autoencoder)."""

    def dictionary_config(
        self, d_in: int, d_sae: int, d_out: int | None = None, skip: bool = False
    ) -> DictionaryConfig:
        return DictionaryConfig(
            architecture=self.architecture,
            d_in=d_in,
            d_sae=d_sae,
            k=self.cfg.k if architecture_class(self.architecture).needs_k else None,
            # A transcoder's b_dec is in the output space: never subtracted from its input.
            apply_b_dec_to_input=self.apply_b_dec_to_input and d_out is None,
            d_out=d_out,
            skip=skip,
        )

    @torch.no_grad()
    def init_weights(self, d: Dictionary, gen: torch.Generator) -> None:
        """Random decoder rows of norm `decoder_row_norm`, W_enc = W_dec^T, b_enc = 0.

        A transcoder's encoder reads another space than its decoder writes: its columns are
        drawn on their own, at the norm W_dec^T's would have; W_skip starts at 0."""
        w = torch.randn(d.d_sae, d.d_out, generator=gen, device=gen.device)
        w = F.normalize(w, dim=-1) * self.decoder_row_norm()
        d.W_dec.copy_(w)
        if d.cfg.is_transcoder:
            e = torch.randn(d.d_sae, d.d_in, generator=gen, device=gen.device)
            w = F.normalize(e, dim=-1) * self.decoder_row_norm()
            if d.cfg.skip:
                d.get_parameter("W_skip").zero_()
        d.W_enc.copy_(w.T * self.encoder_init_scale())
        d.b_enc.zero_()

    def decoder_row_norm(self) -> float:
        return 1.0

    def encoder_init_scale(self) -> float:
        """W_enc starts as W_dec^T times this."""
        return 1.0

    def loss(
        self, d: Dictionary, x: Float[Tensor, "B D"], y: Float[Tensor, "B O"], ctx: StepContext
    ) -> LossOutput:
        """The loss of reconstructing `y` from `x`: `y` is `x` itself for a sparse autoencoder,
        the target activation (e.g. the MLP's output) for a transcoder."""
        raise NotImplementedError

    def before_optimizer_step(self, d: Dictionary) -> None:
        """Called after gradients are final (all-reduced, before clipping)."""
        if self.unit_norm_decoder:
            remove_parallel_grad_(d)

    def after_optimizer_step(self, d: Dictionary, out: ForwardOutput) -> None:
        if self.unit_norm_decoder:
            normalize_decoder_rows_(d)

    def finalize(self, d: Dictionary) -> Dictionary:
        """The module to save (still in the scaled input space; the trainer folds the scale)."""
        return d

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
