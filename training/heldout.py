"""Held-out evaluation: the figures a user reads about a finished dictionary.

Every final number (FVU, explained variance, MSE, L0, the fractions of features that never
fire or fire densely, and with the language model the loss recovered and KL) is measured on
activations the trainer never saw. `HeldOutEval` is the trainer's evaluator: called with a
dictionary and its input scale, it returns those figures as a flat dict; the trainer logs them
as `eval/*` and writes them into the saved dictionary's provenance (`provenance["eval"]`), and
`sae.evaluation` prints them the same way everywhere.

"Never fired" is counted over all `eval_tokens` held-out tokens: at 100,000 tokens a feature
of density 1e-4 fires about 10 times, so a feature reported dead has density well below that.

Where the held-out tokens come from (saved in words as `provenance["eval_source"]`):
- with `sae train --cache`: a separate evaluation cache of held-out text (`--eval.cache`), or
  the training cache's last whole contexts, which are then not trained on
  (training/cache_source.py);
- a model stream: the first contexts of another split, or contexts the training stream skips
  (training/stream_source.py).

Loss recovered splices the reconstruction into the model at the hook on the held-out contexts
(positions the cache left out, BOS, keep the model's own activation) and compares next-token
loss with the clean and zero-ablated model: (zero - spliced) / (zero - clean). A transcoder's
held-out rows are pairs (its input and target activations of the same tokens): its FVU is of
the target, and for loss recovered its output replaces the target hook (the MLP's output),
computed in the same forward pass from the model's own activation at its input hook; the
baseline zero-ablates the target hook (the MLP removed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from activations.hooks import run_with_edits
from sae.base import Dictionary
from training.evals import evaluate

logger = logging.getLogger(__name__)


@dataclass
class HeldOutContexts:
    """Held-out contexts for the loss-recovered evaluation."""

    tokens: Int[Tensor, "C S"]
    """Token ids of each context."""
    valid: Bool[Tensor, "C S"] | None = None
    """Positions whose activation the held-out set holds (False: BOS the cache dropped); the
    reconstruction is spliced in only there. None: every position."""


class HeldOutEval:
    """Evaluate a dictionary on held-out activations (and optionally the model's loss).

    Callable as the trainer's evaluator: `(dictionary, input_scale) -> dict[str, float]`, where
    `input_scale` is for a dictionary still in its training space (1.0 for a saved one).
    """

    def __init__(
        self,
        activations: Float[Tensor, "N D"],
        *,
        targets: Float[Tensor, "N O"] | None = None,
        hook_name_out: str | None = None,
        model: Any = None,
        hook_name: str | None = None,
        contexts: HeldOutContexts | None = None,
        dense_threshold: float = 0.1,
        batch_size: int = 8192,
        context_batch: int = 16,
        source: str | None = None,
    ) -> None:
        if activations.ndim != 2 or activations.shape[0] == 0:
            raise ValueError(f"held-out activations must be [N>0, d_in], got {activations.shape}")
        if (model is None) != (contexts is None) or (model is not None and hook_name is None):
            raise ValueError("loss recovered needs the model, its hook name and the contexts")
        if targets is not None and targets.shape[0] != activations.shape[0]:
            raise ValueError(f"{targets.shape[0]} target rows for {activations.shape[0]} inputs")
        if model is not None and (targets is None) != (hook_name_out is None):
            raise ValueError("a transcoder's loss recovered needs its targets and target hook")
        self.activations = activations
        self.targets = targets
        """A transcoder's target rows (None: a sparse autoencoder, the target is the input)."""
        self.hook_name_out = hook_name_out
        self.model = model
        self.hook_name = hook_name
        self.contexts = contexts
        self.dense_threshold = dense_threshold
        self.batch_size = batch_size
        self.context_batch = context_batch
        self.source = source
        """Where the held-out tokens come from, in words (provenance `eval_source`)."""
        self._zero_loss: tuple[float, int] | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.activations.shape[0])

    @torch.no_grad()
    def __call__(
        self, dictionary: Dictionary, input_scale: float = 1.0, output_scale: float | None = None
    ) -> dict[str, float]:
        """The figures of `dictionary`; the scales are those of a dictionary still in its
        training space (1.0 for a saved one; `output_scale` defaults to `input_scale`)."""
        if dictionary.cfg.is_transcoder != (self.targets is not None):
            want = "a transcoder" if self.targets is not None else "a sparse autoencoder"
            raise ValueError(f"these held-out rows are for {want}")
        out_scale = input_scale if output_scale is None else output_scale
        was_training = dictionary.training
        dictionary.eval()
        try:
            xs = self.activations.split(self.batch_size)
            ys = xs if self.targets is None else self.targets.split(self.batch_size)
            pairs = ((x * input_scale, y * out_scale) for x, y in zip(xs, ys, strict=True))
            r = evaluate(dictionary, pairs, self.dense_threshold)
            figures = {
                "eval_tokens": float(self.n_tokens),
                "fvu": r.fvu,
                "explained_variance": r.explained_variance,
                "mse": r.mse / out_scale**2,
                "l0": r.l0,
                "dead_fraction": r.dead_fraction,
                "dense_fraction": r.dense_fraction,
            }
            if self.model is not None:
                figures.update(self._loss_recovered(dictionary, input_scale, out_scale))
            return figures
        finally:
            dictionary.train(was_training)

    # -- loss recovered ------------------------------------------------------------------------
    @property
    def splice_hook(self) -> str | None:
        """Where the reconstruction goes: a transcoder's target hook, else its own hook."""
        return self.hook_name_out or self.hook_name

    def _loss_recovered(
        self, dictionary: Dictionary, input_scale: float, output_scale: float
    ) -> dict[str, float]:
        assert self.contexts is not None and self.hook_name is not None
        device = _model_device(self.model)
        ce_clean = ce_spliced = kl = 0.0
        n = 0
        for tokens, valid in self._context_batches(device):
            target = tokens[:, 1:]
            edits = splice_edits(dictionary, self.hook_name, input_scale, output_scale, valid)
            clean = run_with_edits(self.model, tokens, {})[:, :-1].float().log_softmax(-1)
            spliced = run_with_edits(self.model, tokens, edits)
            spliced = spliced[:, :-1].float().log_softmax(-1)
            ce_clean += float(_nll_sum(clean, target))
            ce_spliced += float(_nll_sum(spliced, target))
            kl += float((clean.exp() * (clean - spliced)).sum())
            n += target.numel()
        zero_sum, zero_n = self._zero_ablated(device)
        clean_loss, spliced_loss, zero_loss = ce_clean / n, ce_spliced / n, zero_sum / zero_n
        gap = zero_loss - clean_loss
        return {
            "clean_loss": clean_loss,
            "spliced_loss": spliced_loss,
            "zero_ablated_loss": zero_loss,
            "loss_recovered": (zero_loss - spliced_loss) / gap if abs(gap) > 1e-12 else 0.0,
            "kl_div": kl / n,
        }

    def _zero_ablated(self, device: torch.device) -> tuple[float, int]:
        """Loss with the spliced hook zeroed at the same positions: the same for every
        dictionary of the hook."""
        assert self.splice_hook is not None
        if self._zero_loss is None:
            total, n = 0.0, 0
            for tokens, valid in self._context_batches(device):
                zero = _masked(lambda act: torch.zeros_like(act), valid)
                logits = run_with_edits(self.model, tokens, {self.splice_hook: zero})
                total += float(_nll_sum(logits[:, :-1].float().log_softmax(-1), tokens[:, 1:]))
                n += tokens[:, 1:].numel()
            self._zero_loss = (total, n)
        return self._zero_loss

    def _context_batches(self, device: torch.device) -> Any:
        assert self.contexts is not None
        tokens, valid = self.contexts.tokens, self.contexts.valid
        for i in range(0, tokens.shape[0], self.context_batch):
            t = tokens[i : i + self.context_batch].to(device)
            v = None if valid is None else valid[i : i + self.context_batch].to(device)
            yield t, v


def _nll_sum(logp: Float[Tensor, "C S V"], target: Int[Tensor, "C S"]) -> Tensor:
    return F.nll_loss(logp.reshape(-1, logp.shape[-1]), target.reshape(-1), reduction="sum")


def _masked(edit: Any, valid: Tensor | None) -> Any:
    """Apply `edit` to a hook activation [C, S, D] only where `valid` [C, S] is True."""
    if valid is None:
        return edit

    def apply(act: Tensor) -> Tensor:
        return torch.where(valid.unsqueeze(-1), edit(act), act)

    return apply


def splice_edits(
    dictionary: Dictionary,
    hook_name: str,
    input_scale: float = 1.0,
    output_scale: float | None = None,
    valid: Tensor | None = None,
) -> dict[str, Any]:
    """`run_with_edits` edits that splice the dictionary into the model where `valid` (every
    position if None): a sparse autoencoder's reconstruction replaces its hook's activation; a
    transcoder's output, computed from the activation at its input hook `hook_name` in the
    same forward pass, replaces its target hook's (`cfg.hook_name_out`)."""
    out_scale = input_scale if output_scale is None else output_scale

    def transcode(x: Tensor, like: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(dictionary.device, dictionary.dtype)
        y_hat = dictionary(flat * input_scale).x_hat / out_scale
        return y_hat.reshape(*like.shape[:-1], -1).to(like.device, like.dtype)

    if not dictionary.cfg.is_transcoder:
        return {hook_name: _masked(lambda act: transcode(act, act), valid)}
    target = dictionary.cfg.hook_name_out
    if target is None:
        raise ValueError("a transcoder without hook_name_out cannot be spliced into a model")
    seen: list[Tensor] = []

    def record(act: Tensor) -> Tensor:
        seen.append(act)
        return act

    def replace(act: Tensor) -> Tensor:
        if not seen:
            raise ValueError(f"{target} ran before the transcoder's input hook {hook_name}")
        return transcode(seen.pop(), act)

    return {hook_name: record, target: _masked(replace, valid)}


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")
