"""Data-dependent initialisation: the input scale and the decoder bias.

Both are estimated once from the first `init_tokens` tokens of the run and then frozen (the
scale is folded into the saved weights; b_dec keeps training).
"""

from __future__ import annotations

import math

from jaxtyping import Float
from torch import Tensor


def input_scale(sample: Float[Tensor, "B D"]) -> float:
    """s = sqrt(d_in) / mean ||x||, so that s*x has mean squared norm about d_in.

    Anthropic (April 2024) and SAELens normalise this way, which makes one l1_coefficient and
    learning rate work across models and layers whose activations differ in scale.
    """
    mean_norm = sample.float().norm(dim=-1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError("cannot estimate the input scale: the sample has zero or non-finite norm")
    return math.sqrt(sample.shape[-1]) / mean_norm


def geometric_median(
    points: Float[Tensor, "B D"], iters: int = 100, tol: float = 1e-6
) -> Float[Tensor, " D"]:
    """The point minimising the summed Euclidean distance (Weiszfeld's algorithm).

    Towards Monosemanticity initialises b_dec here: unlike the mean it is not dragged by the
    rare large-norm activations that are common in language models.
    """
    points = points.float()
    median = points.mean(0)
    for _ in range(iters):
        dist = (points - median).norm(dim=-1).clamp_min(1e-8)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        shift = (new - median).norm().item()
        median = new
        if shift <= tol * max(1.0, median.norm().item()):
            break
    return median
