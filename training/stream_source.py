"""Training straight from a model: the stream options, one source per hook, the held-out set.

`sae train --model M --hooks H1 H2 ...` runs the model once per batch of contexts and feeds
every hook's rows to that hook's trainer (training/stream_train.py). Here:
- `StreamConfig`: the options beside `TrainConfig` (model, hooks, text, buffer, held-out);
- `SharedStream`: one producer (`activations.stream.StreamedActivations`, the model on a
  thread) and one `HookView` per hook, each a `ResumableSource` whose position is the rows its
  trainer was handed. Under torchrun each rank streams its own shard of the text, and the
  ranks' local batches are gathered into the global batch every rank trains on its share of
  (training/distributed.py), as with a cache;
- the held-out set: the first contexts of the text, which the training stream skips, or the
  first contexts of another split (`heldout_split`); their activations for every hook come from
  one pass, and one `HeldOutEval` per hook shares the model and tokens (the model's hook lock,
  activations/hooks.py, keeps its runs apart from the producer's).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from activations.stream import StreamBatch, StreamedActivations
from activations.text import TextConfig, context_batches
from training.distributed import DistInfo
from training.heldout import HeldOutContexts, HeldOutEval

logger = logging.getLogger(__name__)


@dataclass
class StreamConfig:
    """Training from a model instead of a cache: which model, hooks and text."""

    model: str | None = None
    """Train straight from this model (the bundled short name, a local Hugging Face directory
    or a hub name) instead of a cache; only checkpoints, metrics and dictionaries are written."""
    hooks: tuple[str, ...] = ()
    """TransformerLens hooks to train on, all from one forward pass; one dictionary (or sweep)
    each, in OUT/<hook>/ when there are several."""
    text: TextConfig = field(default_factory=TextConfig)
    """The text source and packing (the same options as `sae cache`)."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in."""
    drop_bos: bool = True
    """Leave out position 0 (BOS) of every context, as `sae cache` does."""
    buffer_tokens: int = 131_072
    """Activations pooled and shuffled before they are cut into batches, rounded up to whole
    forward passes: the rows of one context spread over every batch the pool feeds."""
    prefetch_batches: int = 4
    """Batches the model computes ahead of training (the producer thread's queue)."""
    heldout_split: str | None = None
    """Hold out the first contexts of this split (e.g. validation) for the final evaluation;
    unset: the first contexts of the training text, which the training stream then skips."""

    def __post_init__(self) -> None:
        if self.buffer_tokens < 1 or self.prefetch_batches < 1:
            raise ValueError("buffer_tokens and prefetch_batches must be >= 1")

    def mix_passes(self) -> int:
        """Forward passes pooled in one shuffling window."""
        rows = self.text.batch_size * (self.text.context_size - (1 if self.drop_bos else 0))
        return max(1, math.ceil(self.buffer_tokens / rows))


class HookView:
    """One hook's batches of a `SharedStream`: a `ResumableSource` for that hook's trainer."""

    def __init__(self, shared: SharedStream, hook: str) -> None:
        self.shared = shared
        self.hook = hook
        self.position = 0
        """Rows of this rank's text stream handed to the trainer (or skipped on resume)."""
        self.queue: deque[tuple[int, Tensor]] = deque()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.shared.stream.seed, "hook": self.hook}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shared.stream.load_state_dict({**state, "epoch": 0})
        self.position = int(state["position"])
        self.queue.clear()

    def __iter__(self) -> Iterator[Float[Tensor, "B D"]]:
        while True:
            while not self.queue and self.shared.pull():
                pass
            if not self.queue:
                return
            self.position, batch = self.queue.popleft()
            yield batch


class SharedStream:
    """One producer for every hook: a batch pulled for one hook is queued for the others."""

    def __init__(self, stream: StreamedActivations, dist: DistInfo) -> None:
        self.stream = stream
        self.dist = dist
        self.views = {h: HookView(self, h) for h in stream.hook_names}
        self._it: Iterator[StreamBatch] | None = None
        self._ended = False

    def pull(self) -> bool:
        """Move the next batch of every hook into the views that have not read past it."""
        if self._ended:
            return False
        if self._it is None:  # starts where the view furthest behind stands
            self.stream.epoch = 0
            self.stream.position = min(v.position for v in self.views.values())
            self._it = self.stream.batches()
        item = next(self._it, None)
        if item is not None and len(item.acts[self.stream.hook_names[0]]) < self.stream.batch_size:
            item = None  # a partial last batch: ranks could disagree on its size
        if self._any_ended(item is None):
            self._ended = True
            self.close()
            return False
        assert item is not None
        start = item.position - self.stream.batch_size
        for hook, view in self.views.items():
            if start >= view.position:
                view.queue.append((item.position, self._gather(item.acts[hook])))
        return True

    def _any_ended(self, ended: bool) -> bool:
        if not self.dist.enabled:
            return ended
        import torch.distributed as dist

        flag = torch.tensor([1.0 if ended else 0.0], device=self.stream.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _gather(self, local: Tensor) -> Tensor:
        """Every rank's local batch, in rank order: the global batch (training/distributed.py
        gives each rank back its own rows)."""
        if not self.dist.enabled:
            return local
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(self.dist.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
            self._it = None


def heldout_contexts(cfg: StreamConfig, n_tokens: int) -> tuple[TextConfig, int]:
    """(text, contexts) of the held-out set for about `n_tokens` rows per hook."""
    per_context = cfg.text.context_size - (1 if cfg.drop_bos else 0)
    n_contexts = max(1, math.ceil(n_tokens / per_context))
    text = cfg.text if cfg.heldout_split is None else replace(cfg.text, split=cfg.heldout_split)
    return text, n_contexts


@torch.no_grad()
def heldout_evaluators(
    stream: StreamedActivations,
    cfg: StreamConfig,
    n_tokens: int,
    *,
    loss_recovered: bool,
    dense_threshold: float,
) -> dict[str, HeldOutEval]:
    """One evaluator per hook on the held-out contexts (every hook from one forward pass)."""
    from activations.hooks import ActivationCapture

    text, n_contexts = heldout_contexts(cfg, n_tokens)
    model = stream.model
    device = next(model.parameters()).device
    tokens_list: list[Tensor] = []
    acts: dict[str, list[Tensor]] = {h: [] for h in stream.hook_names}
    with ActivationCapture(model, stream.hook_names) as capture:
        for batch in context_batches(text, model.tokenizer, max_contexts=n_contexts):
            tokens_list.append(batch.tokens)
            for h, a in capture(batch.tokens.to(device)).items():
                acts[h].append(a[:, stream.p0 :].reshape(-1, a.shape[-1]).float().cpu())
    if not tokens_list:
        from sae.errors import UserError

        raise UserError(f"the text ({text.dataset}, split {text.split}) gave no held-out context")
    tokens = torch.cat(tokens_list)
    valid = torch.ones(tokens.shape, dtype=torch.bool)
    valid[:, : stream.p0] = False
    contexts = HeldOutContexts(tokens, valid)
    source = (f"the first {tokens.shape[0]:,} contexts of {text.dataset} split {text.split}"
              + (", skipped by the training stream" if cfg.heldout_split is None else ""))  # fmt: skip
    logger.info("held out %s (%d tokens a hook)", source, int(valid.sum()))
    return {
        h: HeldOutEval(
            torch.cat(acts[h]),
            model=model if loss_recovered else None,
            hook_name=h if loss_recovered else None,
            contexts=contexts if loss_recovered else None,
            dense_threshold=dense_threshold,
            source=source,
        )
        for h in stream.hook_names
    }
