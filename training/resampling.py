"""Dead-feature resampling, as in "Towards Monosemanticity" (Bricken et al. 2023, Appendix
"Neuron Resampling"), and the firing tracker that decides which features are dead.

At each scheduled point, a feature that has not fired for `window_tokens` tokens is dead.
For each dead feature:
  1. draw an input with probability proportional to the square of the dictionary's
     reconstruction loss on it (inputs the dictionary explains worst are likeliest);
  2. decoder row  <- that input, normalised to unit norm;
  3. encoder row  <- the same direction, scaled to 0.2 x the mean encoder norm of alive features;
  4. encoder bias <- 0;
  5. Adam's moments (exp_avg, exp_avg_sq) of the touched rows/columns <- 0, so stale momentum
     from the dead feature does not push the fresh one around.
The window is counted in tokens, not steps, so it means the same thing at any batch size and
under data parallelism (where each process sees a share of each batch).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sae.base import Dictionary

logger = logging.getLogger(__name__)


class FiringTracker:
    """Tokens since each feature last fired (on any process)."""

    def __init__(self, d_sae: int, device: torch.device) -> None:
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, fired: Bool[Tensor, " F"], n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)

    def dead(self, window_tokens: int) -> Bool[Tensor, " F"]:
        return self.tokens_since_fired >= window_tokens

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_since_fired": self.tokens_since_fired.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


@torch.no_grad()
def reconstruction_losses(
    d: Dictionary, inputs: Float[Tensor, "N D"], chunk: int = 8192
) -> Float[Tensor, " N"]:
    """||x - x_hat||^2 for each input."""
    out = [
        (d(x).x_hat - x).pow(2).sum(-1).float() for x in inputs.split(chunk)
    ]  # chunked: the pool may be larger than one batch
    return torch.cat(out)


def _reset_adam_(
    optimizer: torch.optim.Optimizer, param: Tensor, index: Int[Tensor, " N"], dim: int
) -> None:
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, index, 0.0)


@torch.no_grad()
def resample_dead_features(
    d: Dictionary,
    optimizer: torch.optim.Optimizer,
    dead: Bool[Tensor, " F"],
    inputs: Float[Tensor, "N D"],
    generator: torch.Generator,
    encoder_scale: float = 0.2,
) -> Int[Tensor, " R"]:
    """Re-initialise every dead feature from poorly reconstructed inputs; returns their ids.

    `generator` is a CPU generator so the draws are identical on every device and process.
    """
    dead_ids = dead.nonzero().squeeze(-1)
    n_dead = dead_ids.numel()
    if n_dead == 0:
        return dead_ids
    losses = reconstruction_losses(d, inputs).cpu().double()
    weights = losses.pow(2)
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    # Without replacement when the pool is large enough, so dead features get distinct inputs.
    picks = torch.multinomial(
        weights, n_dead, replacement=n_dead > int((weights > 0).sum()), generator=generator
    ).to(inputs.device)
    chosen = inputs[picks].to(d.dtype)
    directions = F.normalize(chosen, dim=-1)

    alive = ~dead
    if alive.any():
        alive_norm = d.W_enc[:, alive].norm(dim=0).mean()
    else:
        alive_norm = torch.ones((), device=d.device, dtype=d.dtype)

    d.W_dec[dead_ids] = directions
    d.W_enc[:, dead_ids] = (directions * alive_norm * encoder_scale).T
    d.b_enc[dead_ids] = 0.0
    _reset_adam_(optimizer, d.W_dec, dead_ids, dim=0)
    _reset_adam_(optimizer, d.W_enc, dead_ids, dim=1)
    _reset_adam_(optimizer, d.b_enc, dead_ids, dim=0)
    logger.info("resampled %d dead feature(s) of %d", n_dead, d.d_sae)
    return dead_ids
