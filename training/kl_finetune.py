"""End-to-end KL fine-tuning after training (Braun, Taylor, Goldowsky-Dill & Sharkey 2024,
"Identifying Functionally Important Features with End-to-End Sparse Dictionary Learning").

A dictionary trained on reconstruction alone spends its capacity on variance the model may not
use. In this phase every member trains on for `kl_finetune.tokens` tokens of whole training
contexts with one more term in its loss: the KL divergence of the model's next-token
distribution with the reconstruction spliced in at the hook (at the positions the activations
cover) from the clean distribution, averaged over predicted positions. The objective's own loss
stays in, so the dictionary still reconstructs the activations and keeps its sparsity (relu's
L1 and its L0 steering, AuxK, the fixed k of the TopK family).

The objectives' losses differ in scale by orders of magnitude (an FVU for the TopK family, a
squared error summed over d_in for relu_l1), so the KL term's weight is set on the phase's
first batch, per member, to `coefficient` x (objective loss / KL) there. The learning rate is
constant, `lr_fraction` of the peak. The contexts are the cache's training rows, from its start:
never the held-out tail, and the same contexts after a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from activations.contexts import ActivationBatch
from activations.hooks import model_lock
from sae.errors import UserError
from training.config import KLFinetuneConfig

if TYPE_CHECKING:
    from training.member import ExtraLoss, Member
    from training.trainer import Trainer

logger = logging.getLogger(__name__)


def spliced_kl(
    model: Any,
    hook_name: str,
    tokens: Int[Tensor, "C T"],
    valid: Bool[Tensor, "C T"],
    x_hat: Float[Tensor, "N D"],
    clean: Float[Tensor, "C T-1 V"],
) -> Tensor:
    """Mean KL(clean || spliced) over the predicted positions, with `x_hat` (the rows of the
    valid positions, in order) in place of the hook's activation there; differentiable in
    `x_hat`, not in the model's weights."""

    def splice(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        out[valid] = x_hat.to(act.dtype)
        return out

    with model_lock(model), model.hooks(fwd_hooks=[(hook_name, splice)]):
        logits = model(tokens, return_type="logits")
    spliced = logits[:, :-1].float().log_softmax(-1)
    return (clean.exp() * (clean - spliced)).sum(-1).mean()


class KLPhase:
    """The fine-tuning phase: `run(trainer)` after the main loop, before the dictionaries are
    saved. `contexts` yields whole training contexts with their activations."""

    def __init__(
        self,
        cfg: KLFinetuneConfig,
        model: Any,
        hook_name: str,
        contexts: Iterator[ActivationBatch],
    ) -> None:
        for p in model.parameters():
            p.requires_grad_(False)  # gradients flow through the activations only
        self.cfg = cfg
        self.model = model
        self.hook_name = hook_name
        self.contexts = contexts
        self.weights: dict[str, float] = {}

    def _term(self, tokens: Tensor, valid: Tensor, clean: Tensor) -> ExtraLoss:
        def term(m: Member, x_hat: Tensor, objective_loss: Tensor) -> tuple[Tensor, dict]:
            kl = spliced_kl(self.model, self.hook_name, tokens, valid, x_hat, clean)
            if m.name not in self.weights:
                ratio = float(objective_loss.detach()) / max(float(kl.detach()), 1e-8)
                self.weights[m.name] = self.cfg.coefficient * ratio
                logger.info("%s: KL fine-tuning, KL weight %.4g", m.name, self.weights[m.name])
            return self.weights[m.name] * kl, {"kl": kl.detach()}

        return term

    def _step(self, trainer: Trainer, x: Tensor, extra_loss: ExtraLoss, bar: Any) -> None:
        """One step of every member on `x`: counters and logging, no resampling."""
        n, step = x.shape[0], trainer.step
        log_now = (step + 1) % trainer.cfg.logging.log_every_steps == 0
        rows = {m.name: m.train_step(x, step, n, log_now, trainer.tokens, extra_loss,
                                     m.cfg.optim.lr * self.cfg.lr_fraction)
                for m in trainer.members}  # fmt: skip
        trainer.step += 1
        trainer.tokens += n
        bar.update(n)
        if log_now:
            trainer.log_rows(rows, bar)

    def run(self, trainer: Trainer, bar: Any) -> bool:
        """Fine-tune every member; False if a stop signal ended it early."""
        device = trainer.device
        done = 0
        logger.info("KL fine-tuning for %d tokens", self.cfg.tokens)
        while done < self.cfg.tokens:
            batch = next(self.contexts, None)
            if batch is None:
                logger.warning("KL fine-tuning: the contexts ended after %d tokens", done)
                break
            tokens = batch.tokens.to(device)
            valid = (
                torch.ones(tokens.shape, dtype=torch.bool, device=device)
                if batch.valid is None
                else batch.valid.to(device)
            )
            x = batch.acts.to(device, torch.float32)[valid]
            with torch.no_grad(), model_lock(self.model):
                clean = self.model(tokens, return_type="logits")[:, :-1].float().log_softmax(-1)
            self._step(trainer, x, self._term(tokens, valid, clean), bar)
            done += x.shape[0]
            if trainer.stop_requested():
                return False
        return True


def check_cache(cfg: KLFinetuneConfig, cache: Any, hook_name: str | None, loss: bool) -> None:
    """Before any work: a UserError if the cache cannot feed the phase (no known model, or
    fewer than twice as many rows as the phase would read)."""
    from activations.cache_format import read_cache_config
    from activations.reader import CacheShards

    if not loss or not (read_cache_config(cache) or {}).get("model"):
        raise UserError(
            "KL fine-tuning needs the language model the cache was written from (the cache's "
            "cache_config.json) and --eval.loss-recovered true"
        )
    rows = CacheShards(cache, hook_name).n_rows
    if cfg.tokens > rows // 2:
        raise UserError(
            f"--kl-finetune.tokens {cfg.tokens} is more than half the cache's {rows} rows; "
            "cache more tokens or fine-tune on fewer"
        )


def cache_phase(cfg: KLFinetuneConfig, cache: Any, evaluator: Any) -> KLPhase:
    """The phase for `sae train --cache`: the cache's first training contexts (check_cache
    keeps them clear of the held-out tail) and its model (the held-out evaluator's)."""
    from activations.contexts import cached_activations
    from activations.text import special_ids

    model, hook = evaluator.model, evaluator.hook_name
    fill = special_ids(model.tokenizer)[0]
    contexts = cached_activations(cache, hook, cfg.tokens, cfg.contexts_per_step, fill, "cpu")
    return KLPhase(cfg, model, hook, contexts)
