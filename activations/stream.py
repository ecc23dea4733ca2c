"""Activations straight from the model, no disk (EleutherAI sparsify's mode): a
`ResumableSource` of [B, D] batches like the cache reader (activations/source.py), for runs
too short to be worth caching or too large to store.

Rows of one context are consecutive tokens, so `mix_passes` forward passes are pooled and
their rows permuted (seed, epoch, window) before being cut into batches. As in the cache reader
the order is a pure function of the seed, so `state_dict()` is (epoch, position) and a resume
skips whole windows by tokenizing only, without running the model on them.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from activations.hooks import ActivationCapture, check_hook_names, hook_widths
from activations.prefetch import in_background
from activations.text import TextConfig, context_batches
from sae.errors import UserError


class StreamedActivations:
    """Batches [batch_size, d_in] of `hook_name` computed on the fly, for `epochs` passes
    over the text (epoch e shuffles documents with seed text_cfg.seed + e)."""

    def __init__(
        self,
        model: Any,
        hook_name: str,
        text_cfg: TextConfig,
        batch_size: int = 4096,
        device: str | torch.device = "cpu",
        *,
        seed: int = 0,
        epochs: int = 1,
        drop_bos: bool = True,
        mix_passes: int = 8,
        rank: int = 0,
        world_size: int = 1,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(model, str):
            from activations.model import load_model

            model = load_model(model, device=device)
        if batch_size < 1 or epochs < 1 or mix_passes < 1:
            raise ValueError("batch_size, epochs and mix_passes must be positive")
        if text_cfg.context_size > model.cfg.n_ctx:
            raise UserError(
                f"context_size {text_cfg.context_size} exceeds the model's context {model.cfg.n_ctx}"
            )
        self.model = model
        (self.hook_name,) = check_hook_names(model, [hook_name])
        self.d_in = hook_widths(model, [self.hook_name])[self.hook_name]
        self.text_cfg = text_cfg
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.seed = seed
        self.epochs = epochs
        self.p0 = 1 if drop_bos else 0
        self.mix_passes = mix_passes
        self.rank = rank
        self.world_size = world_size
        self.dtype = dtype
        self.epoch = 0
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise UserError(f"stream state is for seed {state.get('seed')}, not {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def _pieces(self, epoch: int, start: int) -> Iterator[Tensor]:
        """This epoch's row order from row `start`, one permuted window at a time."""
        text = dataclasses.replace(self.text_cfg, seed=self.text_cfg.seed + epoch)
        window_contexts = self.mix_passes * text.batch_size
        rows_per_window = window_contexts * (text.context_size - self.p0)
        first = start // rows_per_window
        batches = in_background(
            context_batches(
                text,
                self.model.tokenizer,
                rank=self.rank,
                world_size=self.world_size,
                start=first * window_contexts,
            ),
            depth=2 * self.mix_passes,
        )
        model_device = next(self.model.parameters()).device
        for w in itertools.count(first):
            group = list(itertools.islice(batches, self.mix_passes))
            if not group:
                return
            # Hooks are attached per window, never across a yield: an abandoned stream must
            # not leave hooks on a model that others use.
            with ActivationCapture(self.model, [self.hook_name]) as capture:
                rows = torch.cat(
                    [
                        capture(b.tokens.to(model_device))[self.hook_name][:, self.p0 :].reshape(
                            -1, self.d_in
                        )
                        for b in group
                    ]
                )
            perm = np.random.default_rng([self.seed, epoch, self.rank, w]).permutation(len(rows))
            lo = max(start - w * rows_per_window, 0)
            yield rows[torch.from_numpy(perm[lo:]).to(rows.device)]

    def __iter__(self) -> Iterator[Float[Tensor, "B D"]]:
        B = self.batch_size
        while self.epoch < self.epochs:
            pending: list[Tensor] = []
            held = 0
            for piece in self._pieces(self.epoch, self.position):
                while piece.shape[0]:
                    take = min(B - held, piece.shape[0])
                    pending.append(piece[:take])
                    held += take
                    piece = piece[take:]
                    if held == B:
                        batch = torch.cat(pending) if len(pending) > 1 else pending[0]
                        pending, held = [], 0
                        self.position += B
                        yield batch.to(self.device, self.dtype)
            if held:
                self.position += held
                yield torch.cat(pending).to(self.device, self.dtype)
            self.epoch += 1
            self.position = 0


def stream_activations(
    model: Any,
    hook_name: str,
    text_cfg: TextConfig,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> StreamedActivations:
    """The no-disk source: an iterable of Tensor[batch_size, d_in] (see StreamedActivations)."""
    return StreamedActivations(model, hook_name, text_cfg, batch_size, device, **kwargs)
