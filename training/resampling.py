"""Dead-feature resampling, as in "Towards Monosemanticity" (Bricken et al. 2023, appendix
"Neuron Resampling").

At each scheduled point (TrainConfig.resample_points), a feature that has not fired for
`window_tokens` tokens is dead. For each dead feature:
  1. score a large random sample of activations by the autoencoder's loss on each,
     ||x - x_hat||^2 + l1 * sum_i f_i ||W_dec,i|| (the training loss, per input);
  2. draw an input with probability proportional to the square of that loss;
  3. decoder row  <- that input, normalised to unit norm;
  4. encoder row  <- the same direction, scaled to 0.2 x the mean encoder norm of alive features;
  5. encoder bias <- 0, or, with `fire_fraction`, the value at which the new feature fires on
     that fraction of the scored sample (a feature whose bias lets it fire on too many inputs
     pays a large L1 cost at once and is driven silent again);
  6. Adam's first moment of the touched rows/columns <- 0, so stale momentum from the dead
     feature does not push the fresh one around; the second moment <- that of the alive
     features (see `_reset_adam_`: torch's Adam is bias-corrected by the global step).
A transcoder's sample rows are pairs [x ; y] (input, then target): it is scored by its loss on
y, its encoder row takes the direction of x and its decoder row that of the residual y - y_hat
the new feature is to fill.

"The input" is taken as the encoder sees it, x - b_dec (the paper's autoencoder subtracts the
decoder bias before encoding and adds it back after decoding): the new feature then fires on
the input it was drawn from, which with the raw x it need not when b_dec is large, as for MLP
activations with a large mean.

The sample is `sample_tokens` random rows of the batches in the stretch just before each point
(Bricken et al. scored 819,200 inputs), not the last few batches, whose handful of contexts
would hand many dead features near-copies of the same tokens. Windows are counted in tokens,
not steps, so they mean the same at any batch size and under data parallelism.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from sae.base import Dictionary

if TYPE_CHECKING:
    from training.config import TrainConfig

logger = logging.getLogger(__name__)

BIAS_SAMPLE = 16_384
"""Rows of the scored sample used to place the new features' biases (`fire_fraction`)."""


def split_pairs(
    d: Dictionary, rows: Float[Tensor, "N W"], input_scale: float, output_scale: float
) -> tuple[Float[Tensor, "N D"], Float[Tensor, "N O"]]:
    """(scaled input, scaled target) of raw rows on the dictionary's device: a transcoder's
    rows are [x ; y]; a sparse autoencoder's target is its input."""
    rows = rows.to(d.device, torch.float32)
    if not d.cfg.is_transcoder:
        x = rows * input_scale
        return x, x
    return rows[:, : d.d_in] * input_scale, rows[:, d.d_in :] * output_scale


@torch.no_grad()
def resample_losses(
    d: Dictionary,
    inputs: Float[Tensor, "N D"],
    input_scale: float = 1.0,
    sparsity_coefficient: float = 0.0,
    chunk: int = 8192,
    output_scale: float | None = None,
) -> Float[Tensor, " N"]:
    """The autoencoder's loss on each input: ||y - y_hat||^2 + coefficient * sum_i f_i
    ||W_dec,i||, on CPU in float64 (`inputs` raw, any device and dtype; scaled in chunks;
    y = x but for a transcoder, see `split_pairs`)."""
    row_norms = d.W_dec.norm(dim=-1)
    out_scale = input_scale if output_scale is None else output_scale
    out = []
    for rows in inputs.split(chunk):
        x, y = split_pairs(d, rows, input_scale, out_scale)
        res = d(x)
        loss = (res.x_hat - y).pow(2).sum(-1)
        if sparsity_coefficient:
            loss = loss + sparsity_coefficient * (res.feature_acts.abs() @ row_norms)
        out.append(loss.double().cpu())
    return torch.cat(out)


def _reset_adam_(
    optimizer: torch.optim.Optimizer,
    param: Tensor,
    index: Int[Tensor, " N"],
    keep: Bool[Tensor, " F"],
    dim: int,
) -> None:
    """First moment of the touched slices <- 0; second moment <- the mean of the kept ones.

    torch's Adam corrects both moments' bias by the global step, so a zeroed second moment
    late in training is not treated as empty: the slice's first few hundred updates come out
    2-5x the learning rate, in the sign of the gradient, and scramble the fresh direction
    before it settles. Starting the second moment at the alive features' level gives the new
    feature updates of the usual size, with no stale momentum."""
    state = optimizer.state.get(param)
    if not state:
        return
    if "exp_avg" in state:
        state["exp_avg"].index_fill_(dim, index, 0.0)
    if "exp_avg_sq" in state:
        sq = state["exp_avg_sq"]
        level = sq.index_select(dim, keep.nonzero().squeeze(-1)).mean(dim, keepdim=True)
        shape = list(sq.shape)
        shape[dim] = index.numel()
        sq.index_copy_(dim, index, level.expand(shape).contiguous())


@torch.no_grad()
def resample_dead_features(
    d: Dictionary,
    optimizer: torch.optim.Optimizer,
    dead: Bool[Tensor, " F"],
    inputs: Float[Tensor, "N D"],
    generator: torch.Generator,
    encoder_scale: float = 0.2,
    input_scale: float = 1.0,
    sparsity_coefficient: float = 0.0,
    fire_fraction: float | None = None,
    output_scale: float | None = None,
) -> Int[Tensor, " R"]:
    """Re-initialise every dead feature from poorly reconstructed inputs; returns their ids.

    `inputs` are raw activations (multiplied by `input_scale` as in training). `generator` is
    a CPU generator so the draws are identical on every device and process.
    """
    dead_ids = dead.nonzero().squeeze(-1)
    n_dead = dead_ids.numel()
    if n_dead == 0:
        return dead_ids
    out_scale = input_scale if output_scale is None else output_scale
    weights = resample_losses(
        d, inputs, input_scale, sparsity_coefficient, output_scale=out_scale
    ).pow(2)
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    # Without replacement when the sample is large enough: dead features get distinct inputs.
    picks = torch.multinomial(
        weights, n_dead, replacement=n_dead > int((weights > 0).sum()), generator=generator
    )
    chosen, target = split_pairs(d, inputs[picks.to(inputs.device)], input_scale, out_scale)
    if d.cfg.is_transcoder:
        encoder_dirs = F.normalize(chosen, dim=-1).to(d.dtype)
        directions = F.normalize(target - d(chosen).x_hat.float(), dim=-1).to(d.dtype)
    else:
        directions = F.normalize(chosen - d.b_dec.float(), dim=-1).to(d.dtype)
        encoder_dirs = directions

    alive = ~dead
    if alive.any():
        alive_norm = d.W_enc[:, alive].norm(dim=0).mean()
    else:
        alive_norm = torch.ones((), device=d.device, dtype=d.dtype)

    d.W_dec[dead_ids] = directions
    d.W_enc[:, dead_ids] = (encoder_dirs * alive_norm * encoder_scale).T
    d.b_enc[dead_ids] = 0.0
    if fire_fraction is not None:
        d.b_enc[dead_ids] = _bias_for_fraction(d, dead_ids, inputs, input_scale, fire_fraction)
    keep = alive if alive.any() else torch.ones_like(alive)
    _reset_adam_(optimizer, d.W_dec, dead_ids, keep, dim=0)
    _reset_adam_(optimizer, d.W_enc, dead_ids, keep, dim=1)
    _reset_adam_(optimizer, d.b_enc, dead_ids, keep, dim=0)
    return dead_ids


def _bias_for_fraction(
    d: Dictionary,
    ids: Int[Tensor, " R"],
    inputs: Float[Tensor, "N D"],
    input_scale: float,
    fraction: float,
) -> Float[Tensor, " R"]:
    """Per feature in `ids`, minus the (1 - fraction) quantile of its pre-activation (bias 0)
    over up to BIAS_SAMPLE of `inputs`: with that bias it fires on `fraction` of them."""
    x = inputs[:BIAS_SAMPLE].to(d.device, torch.float32)[:, : d.d_in] * input_scale
    if d.cfg.apply_b_dec_to_input:
        x = x - d.b_dec.float()
    pre = x @ d.W_enc[:, ids].float()  # [N, R]
    n = pre.shape[0]
    k = min(n, max(1, math.ceil(n * (1 - fraction))))
    return -pre.kthvalue(k, dim=0).values.to(d.dtype)


def crossed(points: Sequence[int], tokens_before: int, tokens_after: int) -> bool:
    """Whether a step from `tokens_before` to `tokens_after` tokens reached one of `points`."""
    return any(tokens_before < p <= tokens_after for p in points)


class ResampleSample:
    """Random rows of the batches in the stretch before each resampling point.

    From each batch that overlaps [point - stretch, point) it keeps
    ceil(batch x sample_tokens / stretch) random rows, about `sample_tokens` in all, spread
    over the stretch; `release` drops them once the point is passed. Rows stay in the
    batch's own dtype and device. The generator is seeded, so every process keeps the same rows.
    """

    def __init__(
        self, points: Sequence[int], sample_tokens: int, stretch_tokens: int, seed: int
    ) -> None:
        self.points = sorted(set(points))
        self.sample_tokens = sample_tokens
        self.stretch_tokens = max(stretch_tokens, sample_tokens)
        self.generator = torch.Generator().manual_seed(seed)
        self.chunks: list[Tensor] = []

    @classmethod
    def for_configs(cls, cfgs: Sequence[TrainConfig]) -> ResampleSample:
        """One sample for every member of a run: the union of their points, the largest sample,
        and the stretch of the longest window, at most 8 samples long. (Members whose points
        differ share it: each draws from what was gathered since the last point of any.)"""
        return cls(
            [p for c in cfgs for p in c.resample_points()],
            max(c.resample.sample_tokens for c in cfgs),
            max(min(c.resample_window_tokens(), 8 * c.resample.sample_tokens) for c in cfgs),
            cfgs[0].seed,
        )

    def add(self, x: Float[Tensor, "B D"], tokens_before: int) -> None:
        n = x.shape[0]
        if not any(p - self.stretch_tokens < tokens_before + n and tokens_before < p
                   for p in self.points):  # fmt: skip
            return
        k = min(n, math.ceil(n * self.sample_tokens / self.stretch_tokens))
        rows = torch.randperm(n, generator=self.generator)[:k]
        self.chunks.append(x.detach()[rows.to(x.device)])  # indexing copies the rows

    def rows(self) -> Tensor | None:
        """Everything gathered so far (None if nothing)."""
        if not self.chunks:
            return None
        if len(self.chunks) > 1:
            self.chunks = [torch.cat(self.chunks)]
        return self.chunks[0]

    def release(self, tokens_before: int, tokens_after: int) -> None:
        """Drop the sample once a step has passed a point (every member has resampled)."""
        if crossed(self.points, tokens_before, tokens_after):
            self.chunks = []

    def state_dict(self) -> dict[str, Any]:
        rows = self.rows()
        return {
            "rows": None if rows is None else rows.cpu(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.chunks = [] if state["rows"] is None else [state["rows"].to(device)]
        self.generator.set_state(state["generator"])


class RevivalWatch:
    """Which of the features resampled at the last point fire in the window that follows."""

    def __init__(self, d_sae: int, device: torch.device, window_tokens: int) -> None:
        self.window_tokens = window_tokens
        self.resampled = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.fired = torch.zeros_like(self.resampled)
        self.tokens = 0
        self.open = False

    def start(self, ids: Int[Tensor, " R"]) -> None:
        self.resampled.zero_()
        self.resampled[ids] = True
        self.fired.zero_()
        self.tokens = 0
        self.open = ids.numel() > 0

    def observe(self, fired: Bool[Tensor, " F"], n_tokens: int) -> None:
        if self.open:
            self.fired |= fired & self.resampled
            self.tokens += n_tokens

    def close_if_done(self, force: bool = False) -> int | None:
        """The number revived, once the window after the point has passed (or if `force`)."""
        if not self.open or (self.tokens < self.window_tokens and not force):
            return None
        self.open = False
        return int(self.fired.sum())

    def state_dict(self) -> dict[str, Any]:
        return {
            "resampled": self.resampled.clone(),
            "fired": self.fired.clone(),
            "tokens": self.tokens,
            "open": self.open,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resampled.copy_(state["resampled"])
        self.fired.copy_(state["fired"])
        self.tokens = int(state["tokens"])
        self.open = bool(state["open"])
