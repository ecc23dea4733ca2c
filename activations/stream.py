"""Activations straight from the model, no disk (EleutherAI sparsify's mode): a
`ResumableSource` of [B, D] batches like the cache reader (activations/source.py), for runs
too short to be worth caching or too large to store, and for several hooks at once.

One forward pass serves every hook (it stops after the last one fires). Rows of one context
are consecutive tokens, so `mix_passes` forward passes are pooled as a shuffling buffer and
their rows permuted before being cut into batches; every hook's rows get the same permutation,
so batch i of each hook comes from the same tokens. The permutation of window w is drawn from
a generator seeded by (seed, epoch, rank, w): the buffer's random state is a function of the
position, so `state_dict()` is (epoch, position) and a resume is exact. It skips whole windows
by tokenizing only and runs the model on the window it resumes inside.

The model runs on a producer thread, one window and `prefetch` batches ahead of the consumer
(tokenization on another), so the forward pass overlaps the consumer's work; the position a
consumer sees is that of the batches it was handed, not of the producer's.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from activations.hooks import ActivationCapture, check_hook_names, hook_widths
from activations.prefetch import in_background
from activations.text import TextConfig, context_batches
from sae.errors import UserError


class StreamBatch(NamedTuple):
    """One batch of every hook, and where the stream stands after it."""

    acts: dict[str, Float[Tensor, "B D"]]
    """Rows of each hook (the same tokens for every hook)."""
    epoch: int
    position: int
    """Rows of this epoch (of this rank) read once this batch is consumed."""


class StreamedActivations:
    """Batches [batch_size, d_in] of `hook_names` computed on the fly, for `epochs` passes
    over the text (epoch e shuffles documents with seed text_cfg.seed + e).

    Iterating yields the batches of the only hook (a `BatchSource`); with several hooks,
    `batches()` yields `StreamBatch`es holding every hook's rows. `skip_contexts` leaves out
    the first contexts of the global stream (held out for evaluation). The producer holds the
    model's hook lock only while it runs the model, so others can use the model in between.
    """

    def __init__(
        self,
        model: Any,
        hook_names: str | Sequence[str],
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
        skip_contexts: int = 0,
        prefetch: int = 2,
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
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        self.hook_names = check_hook_names(model, names)
        self.d_ins = hook_widths(model, self.hook_names)
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
        # This rank's contexts among the first skip_contexts of the global stream.
        self.skip = max(0, -(-(skip_contexts - rank) // world_size))
        self.prefetch = prefetch
        self.epoch = 0
        self.position = 0

    @property
    def hook_name(self) -> str:
        if len(self.hook_names) != 1:
            raise ValueError(f"{len(self.hook_names)} hooks; use batches()")
        return self.hook_names[0]

    @property
    def d_in(self) -> int:
        return self.d_ins[self.hook_name]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise UserError(f"stream state is for seed {state.get('seed')}, not {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def _pieces(self, epoch: int, start: int) -> Iterator[dict[str, Tensor]]:
        """This epoch's rows of every hook from row `start`, one permuted window at a time."""
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
                start=self.skip + first * window_contexts,
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
            with ActivationCapture(self.model, self.hook_names) as capture:
                acts = [capture(b.tokens.to(model_device)) for b in group]
            rows = {
                h: torch.cat([a[h][:, self.p0 :].reshape(-1, self.d_ins[h]) for a in acts])
                for h in self.hook_names
            }
            n = len(rows[self.hook_names[0]])
            perm = np.random.default_rng([self.seed, epoch, self.rank, w]).permutation(n)
            lo = max(start - w * rows_per_window, 0)
            index = torch.from_numpy(perm[lo:])
            yield {h: r[index.to(r.device)] for h, r in rows.items()}

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[StreamBatch]:
        B = self.batch_size
        pending: list[dict[str, Tensor]] = []
        held, position = 0, start

        def emit() -> StreamBatch:
            acts = {
                h: torch.cat([p[h] for p in pending]).to(self.device, self.dtype)
                for h in self.hook_names
            }
            return StreamBatch(acts, epoch, position)

        # The next window's forward passes run while this one's batches are handed out.
        for piece in in_background(self._pieces(epoch, start), depth=1):
            n = len(piece[self.hook_names[0]])
            at = 0
            while at < n:
                take = min(B - held, n - at)
                pending.append({h: r[at : at + take] for h, r in piece.items()})
                held, at, position = held + take, at + take, position + take
                if held == B:
                    yield emit()
                    pending, held = [], 0
        if held:
            yield emit()

    def batches(self) -> Iterator[StreamBatch]:
        """Every hook's batches from the current (epoch, position) to the end, computed on a
        producer thread; the stream's own state is not advanced (the consumer keeps it)."""
        for epoch in range(self.epoch, self.epochs):
            start = self.position if epoch == self.epoch else 0
            produced = in_background(self._epoch_batches(epoch, start), depth=self.prefetch)
            try:
                yield from produced
            finally:
                produced.close()  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Float[Tensor, "B D"]]:
        hook = self.hook_name
        for batch in self.batches():
            self.epoch, self.position = batch.epoch, batch.position
            yield batch.acts[hook]
        self.epoch, self.position = self.epochs, 0


def stream_activations(
    model: Any,
    hook_name: str | Sequence[str],
    text_cfg: TextConfig,
    batch_size: int = 4096,
    device: str | torch.device = "cpu",
    **kwargs: Any,
) -> StreamedActivations:
    """The no-disk source: an iterable of Tensor[batch_size, d_in] (see StreamedActivations)."""
    return StreamedActivations(model, hook_name, text_cfg, batch_size, device, **kwargs)
