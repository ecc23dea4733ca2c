"""Learning-rate and sparsity-coefficient schedules, and the target-L0 controller.

All schedules are pure functions of the step, so resuming needs no scheduler state beyond the
step itself; the controller's only state is its current coefficient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from training.config import OptimConfig


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, flat, then decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = int(cfg.decay_start_fraction * total_steps)
    if cfg.decay == "none" or step < decay_start or total_steps <= decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
    lo = cfg.min_lr_fraction
    if cfg.decay == "linear":
        return lo + (1.0 - lo) * (1.0 - progress)
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sparsity_warmup_factor(step: int, total_steps: int, warmup_fraction: float) -> float:
    """Linear ramp of the sparsity penalty from 0 (Anthropic April 2024: the first 5%)."""
    warmup = int(warmup_fraction * total_steps)
    if warmup <= 0 or step >= warmup:
        return 1.0
    return (step + 1) / warmup


@dataclass
class L0Controller:
    """Steers the sparsity coefficient so the batch L0 approaches `target`.

    A multiplicative integral controller on the log scale: every step
        coef <- coef * exp(rate * clip(log(l0 / target), -1, 1)).
    Too many active features raises the penalty, too few lowers it. Working in log space makes
    the step size independent of the coefficient's unknown scale; the clip keeps one odd batch
    (e.g. L0 = 0 just after a resample) from moving it by more than a factor e^rate.
    """

    target: float
    rate: float
    coefficient: float

    def update(self, l0: float) -> float:
        error = math.log(max(l0, 1e-3) / self.target)
        self.coefficient *= math.exp(self.rate * max(-1.0, min(1.0, error)))
        return self.coefficient
