"""How often each feature fires during training: the trailing-window density behind the logged
dead/dense fractions and the density histogram, and the tokens-since-fired counter behind
dead-feature resampling and AuxK.

The density window slides: it is a ring of `buckets` consecutive stretches of tokens, and the
reported density is that of the last `buckets` completed stretches, so it always describes
the recent dictionary rather than the whole run. It starts counting only after the sparsity
warm-up, when the penalty has reached full strength: during the ramp nearly every feature
fires (Bricken et al. 2023, "Towards Monosemanticity", and the April 2024 update ramp the
penalty from 0), which would hide features that die once it bites. Until the window has
filled, there is no density to report and `density_row` says how many tokens it holds.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor


class FiringTracker:
    """Tokens since each feature last fired (on any process)."""

    def __init__(self, d_sae: int, device: torch.device) -> None:
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, fired: Bool[Tensor, " F"], n_tokens: int) -> None:
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired, 0)

    def dead(self, window_tokens: int) -> Bool[Tensor, " F"]:
        """Features that did not fire in the last `window_tokens` tokens."""
        return self.tokens_since_fired >= window_tokens

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_since_fired": self.tokens_since_fired.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


class DensityTracker:
    """Fraction of tokens each feature fires on, over a trailing window of recent tokens.

    `window_tokens` is split into `buckets` stretches; a stretch closes once it holds at least
    window_tokens / buckets tokens (a whole number of batches), and the window is the last
    `buckets` closed stretches. Tokens before `start_tokens` (the sparsity warm-up) are not
    counted.
    """

    def __init__(
        self,
        d_sae: int,
        device: torch.device,
        window_tokens: int,
        start_tokens: int = 0,
        buckets: int = 8,
    ) -> None:
        if window_tokens < 1 or buckets < 1:
            raise ValueError("window_tokens and buckets must be >= 1")
        self.window_tokens = window_tokens
        self.start_tokens = start_tokens
        self.bucket_tokens = max(1, -(-window_tokens // buckets))
        # Row `buckets` is the open stretch; rows 0..buckets-1 the closed ones, oldest first.
        self.counts = torch.zeros(buckets + 1, d_sae, device=device)
        self.tokens = [0] * (buckets + 1)
        self.closed = 0
        """Stretches closed so far (the window is full once this reaches `buckets`)."""

    @property
    def buckets(self) -> int:
        return len(self.tokens) - 1

    def update(self, fired_counts: Float[Tensor, " F"], n_tokens: int, tokens_before: int) -> None:
        """Count one batch of `n_tokens` that started `tokens_before` tokens into the run."""
        if tokens_before < self.start_tokens:
            return
        self.counts[-1] += fired_counts
        self.tokens[-1] += n_tokens
        if self.tokens[-1] >= self.bucket_tokens:
            # Close the open stretch: drop the oldest, shift, reopen an empty one.
            self.counts = torch.roll(self.counts, -1, dims=0)
            self.counts[-1].zero_()
            self.tokens = [*self.tokens[1:], 0]
            self.closed += 1

    @property
    def full(self) -> bool:
        return self.closed >= self.buckets

    @property
    def counted_tokens(self) -> int:
        """Tokens in the window so far, the open stretch included."""
        return sum(self.tokens)

    def current(self, partial: bool = False) -> Tensor | None:
        """Density over the trailing window (closed stretches), on the CPU.

        None until the window is full, unless `partial`: then whatever has been counted since
        the warm-up (open stretch included), or None if nothing has.
        """
        if self.full:
            return (self.counts[:-1].sum(0) / sum(self.tokens[:-1])).cpu()
        if not partial or self.counted_tokens == 0:
            return None
        return (self.counts.sum(0) / self.counted_tokens).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.clone(), "tokens": list(self.tokens), "closed": self.closed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["counts"].shape != self.counts.shape:
            raise ValueError(
                f"density state has {state['counts'].shape[0] - 1} buckets, expected {self.buckets}"
            )
        self.counts.copy_(state["counts"])
        self.tokens = [int(t) for t in state["tokens"]]
        self.closed = int(state["closed"])


def density_summary(density: Float[Tensor, " F"], dense_threshold: float = 0.1) -> dict:
    """Dead fraction (never fired in the window), dense fraction, and log10-density quantiles."""
    log_d = torch.log10(density.clamp_min(1e-10))
    return {
        "dead_fraction": float((density == 0).float().mean()),
        "dense_fraction": float((density > dense_threshold).float().mean()),
        "log10_density_median": float(log_d.median()),
    }


def density_row(tracker: DensityTracker, dense_threshold: float = 0.1) -> dict[str, float]:
    """The metrics a log row gets: the window's summary once it is full, and always the number
    of tokens it covers, so a row before then reads "not enough tokens yet" rather than 0%."""
    density = tracker.current()
    covered = sum(tracker.tokens[:-1]) if tracker.full else tracker.counted_tokens
    row = {"density_tokens": float(covered)}
    if density is not None:
        row.update(density_summary(density, dense_threshold))
    return row
