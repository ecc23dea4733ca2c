"""Lazy Adam for a dictionary's per-feature parameters: a feature's encoder column, encoder
bias and decoder row move, and their Adam moments advance, only on steps that trained it.

A feature that did not fire in a batch has an exactly zero gradient, yet Adam still decays its
moments and moves it along its stale momentum. Worse, a rarely firing feature's second moment
is the average of mostly-zero gradients, so each of its few gradients is amplified: the
updates that follow one firing add up to 10-30 learning rates, in one direction. Under an L1
penalty, a rare feature whose one firing had a net downward gradient is pushed below every
input and never fires again. Lazy updates (TensorFlow's LazyAdam, torch's SparseAdam, for
embedding rows) give each feature Adam's usual step per firing instead. The other parameters
(b_dec, a jumprelu threshold) update every step as usual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sae.base import Dictionary

_FEATURE_DIMS = (("W_enc", 1), ("b_enc", 0), ("W_dec", 0))
"""Per-feature parameters of every architecture and the dimension that indexes features."""


@torch.no_grad()
def hold_silent_features(optimizer: torch.optim.Optimizer, d: Dictionary) -> Callable[[], None]:
    """Save the per-feature parameters and Adam moments of the features this step did not
    train; the returned function, called after `optimizer.step()`, puts them back (the step
    never happened for them). Nothing is saved when every feature was trained.

    A feature is untrained when its encoder-bias gradient is exactly zero: it neither fired
    nor took part in an auxiliary loss (AuxK trains dead latents that did not fire)."""
    grad = d.b_enc.grad
    if grad is None:
        return lambda: None
    ids = (grad == 0).nonzero().squeeze(-1)
    if ids.numel() == 0:
        return lambda: None
    saved: list[tuple[Tensor, int, Tensor]] = []
    for name, dim in _FEATURE_DIMS:
        param = getattr(d, name)
        state = optimizer.state.get(param, {})
        for t in (param, state.get("exp_avg"), state.get("exp_avg_sq")):
            if isinstance(t, Tensor) and t.shape == param.shape:
                saved.append((t, dim, t.index_select(dim, ids)))

    def restore() -> None:
        with torch.no_grad():
            for t, dim, values in saved:
                t.index_copy_(dim, ids, values)

    return restore
