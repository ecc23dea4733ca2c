"""One dictionary in training: its module, objective, optimizer, schedules and counters.

A run trains one or more members on the same batches (a sweep reads the activations once);
the trainer owns the data, the loop, checkpoints and logging, and calls the named steps here.
Each member draws its initial weights and resampling choices from its own CPU generator seeded
by its config, so a member trains identically alone or in a sweep, on any device.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sae.base import Dictionary, build
from sae.devices import native_bf16
from sae.errors import UserError
from sae.sparse_grad import firing_counts
from training.config import TrainConfig
from training.density import DensityTracker, FiringTracker, density_row
from training.distributed import DistInfo, all_reduce_, average_gradients
from training.evals import batch_metrics
from training.initialization import geometric_median
from training.lazy_adam import hold_silent_features
from training.objectives import OBJECTIVES, StepContext
from training.resampling import ResampleSample, RevivalWatch, crossed, resample_dead_features
from training.schedules import L0Controller, lr_factor, sparsity_warmup_factor

logger = logging.getLogger(__name__)

ExtraLoss = Callable[["Member", Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]
"""(member, x_hat in the activations' own units, the objective's loss) -> (a term added to the
loss, parts to log)."""


class Member:
    def __init__(
        self,
        name: str,
        cfg: TrainConfig,
        d_in: int,
        device: torch.device,
        dist: DistInfo,
        d_out: int | None = None,
    ) -> None:
        """`d_out`: a transcoder's target width; its batches are rows [x ; y] of d_in + d_out."""
        self.name = name
        self.cfg = cfg
        self.dist = dist
        self.device = device
        self.d_in = d_in
        d_sae = cfg.dictionary.resolved_d_sae(d_in)
        self.objective = OBJECTIVES[cfg.objective.name](cfg.objective, d_in, d_sae, d_out)
        skip = cfg.transcoder.skip
        if skip and d_out is None:
            raise UserError("--transcoder.skip needs a transcoder (--transcoder.target HOOK)")
        dcfg = self.objective.dictionary_config(d_in, d_sae, d_out, skip=skip)
        dcfg.hook_name = cfg.dictionary.hook_name
        dcfg.model_name = cfg.dictionary.model_name
        if d_out is not None:
            dcfg.hook_name_out = cfg.transcoder.target
        self.dictionary: Dictionary = build(dcfg).to(device)
        self.dictionary.sparse_grad = cfg.sparse_grad
        # The compiled module shares parameters with `dictionary`; objectives call it for the
        # forward pass, constraints and saving use the plain module.
        self.forward_module: Any = (
            torch.compile(self.dictionary) if cfg.compile else self.dictionary
        )
        self.params = [p for p in self.dictionary.parameters() if p.requires_grad]
        # The fused kernel (CUDA and CPU) updates all moments in one pass; same math as eager.
        self.optimizer = torch.optim.Adam(
            self.params,
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            eps=cfg.optim.eps,
            fused=device.type in ("cuda", "cpu"),
        )
        self.firing = FiringTracker(d_sae, device)
        self.density = DensityTracker(
            d_sae, device, cfg.density_window_tokens(), cfg.sparsity_warmup_tokens()
        )
        self.resample_points = cfg.resample_points()
        self.revival = RevivalWatch(d_sae, device, cfg.resample_window_tokens())
        self._event_row: dict[str, float] = {}
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.coefficient = cfg.objective.l1_coefficient
        self.scale = 1.0
        """Input scale the member trains with (folded into the saved weights)."""
        self.out_scale = 1.0
        """A transcoder's target scale (its input's, `scale`, for a sparse autoencoder)."""
        self.n_resampled = 0
        self.kl_tokens = 0
        """Tokens trained with the KL term (training/kl_finetune.py)."""
        self.bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and native_bf16(device))

    # -- start ---------------------------------------------------------------------------------
    @property
    def is_transcoder(self) -> bool:
        return self.dictionary.cfg.is_transcoder

    def split(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(scaled input, scaled target) of a batch: rows [x ; y] for a transcoder, else x."""
        if not self.is_transcoder:
            x = batch * self.scale if self.scale != 1.0 else batch
            return x, x
        x, y = batch[:, : self.d_in], batch[:, self.d_in :]
        return x * self.scale, y * self.out_scale

    @torch.no_grad()
    def initialize(
        self, sample: Tensor, input_scale: float, output_scale: float | None = None
    ) -> None:
        """Weights from the member's generator; b_dec from the (scaled) sample's targets.
        `output_scale`: a transcoder's target scale (default: the input's)."""
        out = input_scale if output_scale is None else output_scale
        normalize = self.cfg.dictionary.normalize_inputs
        self.scale, self.out_scale = (input_scale, out) if normalize else (1.0, 1.0)
        self.objective.init_weights(self.dictionary, self.generator)
        _, x = self.split(sample.to(self.device, torch.float32))
        how = self.cfg.dictionary.b_dec_init
        if how == "geometric_median":
            self.dictionary.b_dec.copy_(geometric_median(x))
        elif how == "mean":
            self.dictionary.b_dec.copy_(x.mean(0))
        else:
            self.dictionary.b_dec.zero_()

    # -- one step ------------------------------------------------------------------------------
    def sparsity_coefficient(self, step: int) -> float:
        warm = sparsity_warmup_factor(
            step, self.cfg.total_steps, self.cfg.objective.l1_warmup_fraction
        )
        return self.coefficient * warm

    def train_step(
        self,
        x: Tensor,
        step: int,
        global_tokens: int,
        want_metrics: bool,
        tokens_before: int = 0,
        extra_loss: ExtraLoss | None = None,
        lr: float | None = None,
    ) -> dict[str, Tensor | float]:
        """Forward, backward, all-reduce, constrain, clip, Adam step, counters. `extra_loss`
        adds a term to the objective's loss (the KL phase); `lr` overrides the schedule."""
        cfg = self.cfg
        x, y = self.split(x)
        if lr is None:
            lr = cfg.optim.lr * lr_factor(step, cfg.total_steps, cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        coef = self.sparsity_coefficient(step)
        ctx = StepContext(coef, self.firing.tokens_since_fired)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.bf16
            else contextlib.nullcontext()
        )
        with autocast:
            res = self.objective.loss(self.forward_module, x, y, ctx)
        loss = res.loss
        if extra_loss is not None:
            extra, parts = extra_loss(self, res.out.x_hat.float() / self.out_scale, res.loss)
            loss = loss + extra
            res.parts.update(parts)
            self.kl_tokens += global_tokens
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.params, self.dist)
        self.objective.before_optimizer_step(self.dictionary)
        grad_norm = None
        if cfg.optim.grad_clip_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip_norm)
        restore = hold_silent_features(self.optimizer, self.dictionary) if cfg.optim.lazy else None
        self.optimizer.step()
        if restore is not None:
            restore()
        self.objective.after_optimizer_step(self.dictionary, res.out)

        f = res.out.feature_acts.detach()
        fired = all_reduce_(firing_counts(res.out), self.dist)
        self.firing.update(fired > 0, global_tokens)
        self.density.update(fired, global_tokens, tokens_before)
        self.revival.observe(fired > 0, global_tokens)
        self._steer(step, fired, global_tokens)
        if not want_metrics:
            return {}
        metrics: dict[str, Tensor | float] = {"loss": loss.detach(), "lr": lr, "coef": coef}
        metrics.update({f"loss/{k}": v for k, v in res.parts.items()})
        metrics.update(batch_metrics(y, res.out.x_hat.detach(), f))
        if grad_norm is not None:
            metrics["grad_norm"] = grad_norm.detach()
        return self._average_over_processes(metrics)

    def _average_over_processes(
        self, metrics: dict[str, Tensor | float]
    ) -> dict[str, Tensor | float]:
        """Per-process batch metrics -> their mean (equal shares, so the global-batch mean for
        the loss; FVU and EV become the mean over shares)."""
        if not self.dist.enabled:
            return metrics
        keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
        stacked = torch.stack([torch.as_tensor(metrics[k]).float().reshape(()) for k in keys])
        all_reduce_(stacked, self.dist)
        stacked /= self.dist.world_size
        return {**metrics, **dict(zip(keys, stacked.unbind(), strict=True))}

    def _steer(self, step: int, fired: Tensor, global_tokens: int) -> None:
        """Target-L0 controller, after the sparsity warm-up (its ramp would fool it).

        The batch L0 is the firing counts (already summed over processes) per token, rather
        than another pass over the codes and another all-reduce."""
        target = self.cfg.objective.target_l0
        if target is None or self.objective.sparsity_penalty == "none":
            return
        if (
            sparsity_warmup_factor(
                step, self.cfg.total_steps, self.cfg.objective.l1_warmup_fraction
            )
            < 1
        ):
            return
        l0 = fired.sum() / global_tokens
        controller = L0Controller(target, self.cfg.objective.target_l0_rate, self.coefficient)
        self.coefficient = controller.update(float(l0))

    # -- resampling ----------------------------------------------------------------------------
    def maybe_resample(self, tokens_before: int, tokens_after: int, sample: ResampleSample) -> int:
        """Resample dead features if this step reached a resampling point; returns the count.

        Also closes the watch on the previous point's features once a window has passed."""
        revived = self.revival.close_if_done(force=crossed(self.resample_points, tokens_before,
                                                           tokens_after))  # fmt: skip
        if revived is not None:
            self._add_event({"resample/revived": revived})
            logger.info(
                "%s: %d of the features resampled last fired within %d tokens",
                self.name, revived, self.revival.tokens,
            )  # fmt: skip
        if not crossed(self.resample_points, tokens_before, tokens_after):
            return 0
        inputs = sample.rows()
        if inputs is None:
            logger.warning("%s: no activations gathered to resample from", self.name)
            return 0
        cfg = self.cfg
        dead = self.firing.dead(cfg.resample_window_tokens())
        ids = resample_dead_features(
            self.dictionary,
            self.optimizer,
            dead,
            inputs,
            self.generator,
            encoder_scale=cfg.resample.encoder_scale,
            fire_fraction=cfg.resample.fire_fraction,
            input_scale=self.scale,
            output_scale=self.out_scale,
            sparsity_coefficient=self.coefficient if self.objective.sparsity_penalty == "l1" else 0,
        )
        n = int(ids.numel())
        # A revived feature gets a full window before it can be judged dead again.
        self.firing.tokens_since_fired[ids] = 0
        self.n_resampled += n
        self.revival.start(ids)
        self._add_event({"resample/dead": int(dead.sum()), "resample/resampled": n})
        logger.info(
            "%s: resampled %d dead feature(s) of %d at %d tokens (dead: no firing in %d tokens; "
            "%d candidate inputs)",
            self.name, n, self.dictionary.d_sae, tokens_after, cfg.resample_window_tokens(),
            inputs.shape[0],
        )  # fmt: skip
        return n

    def _add_event(self, counts: dict[str, int]) -> None:
        """Counts for the next log row, summed over the events since the last one."""
        for key, value in counts.items():
            self._event_row[key] = self._event_row.get(key, 0.0) + value

    def log_row(self, dense_threshold: float) -> dict[str, float]:
        """Density over the trailing window, and resampling events since the last row."""
        row = density_row(self.density, dense_threshold)
        row.update(self._event_row)
        row["resampled_features"] = float(self.n_resampled)
        self._event_row = {}
        return row

    # -- end -----------------------------------------------------------------------------------
    @torch.no_grad()
    def final_dictionary(self, tokens: int) -> Dictionary:
        """A copy in the saved form: objective-specific folding, then the input scale folded."""
        d = self.objective.finalize(copy.deepcopy(self.dictionary))
        if self.is_transcoder and (self.scale, self.out_scale) != (1.0, 1.0):
            d.fold_input_scale(self.scale, self.out_scale)
        elif self.scale != 1.0:
            d.fold_input_scale(self.scale)
        d.cfg.provenance = {
            **d.cfg.provenance,
            "objective": self.cfg.objective.name,
            "tokens": tokens,
            "l1_coefficient": self.coefficient,
            "seed": self.cfg.seed,
            "resampled_features": self.n_resampled,
            **({"kl_finetune_tokens": self.kl_tokens} if self.kl_tokens else {}),
        }
        return d

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "dictionary": self.dictionary.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "firing": self.firing.state_dict(),
            "density": self.density.state_dict(),
            "revival": self.revival.state_dict(),
            "event_row": dict(self._event_row),
            "generator": self.generator.get_state(),
            "coefficient": self.coefficient,
            "scale": self.scale,
            "out_scale": self.out_scale,
            "n_resampled": self.n_resampled,
            "objective": self.objective.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dictionary.load_state_dict(state["dictionary"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.firing.load_state_dict(state["firing"])
        self.density.load_state_dict(state["density"])
        self.revival.load_state_dict(state["revival"])
        self._event_row = dict(state["event_row"])
        self.generator.set_state(state["generator"])
        self.coefficient = float(state["coefficient"])
        self.scale = float(state["scale"])
        self.out_scale = float(state.get("out_scale", self.scale))
        self.n_resampled = int(state["n_resampled"])
        self.objective.load_state_dict(state["objective"])
