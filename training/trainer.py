"""The training loop: batches in, dictionaries out.

    trainer = Trainer(TrainConfig(...), d_in=768)
    result = trainer.fit(batches)          # a BatchSource: iterates Tensor[batch, d_in]
    result.dictionaries["dictionary"]      # saved in result.out_dir / "dictionary"

A transcoder (`d_out` given, TrainConfig.transcoder) trains on paired rows: each batch is
Tensor[batch, d_in + d_out], the input hook's activation then the target's, of the same tokens
(`activations.source`).

`fit` reads like SAELens's SAETrainer.fit: next batch, train step (every member of a sweep
on the same batch), log, maybe resample, maybe evaluate, maybe checkpoint (`run` is the same
loop one step at a time). The data source is only iterated (`activations.source.BatchSource`);
if it is a `ResumableSource`, a checkpoint records its position, so `resume=True` continues
with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from activations.source import BatchSource, ResumableSource
from sae.base import Dictionary
from sae.errors import UserError
from training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.config import TrainConfig
from training.distributed import all_reduce_, init_from_env, resolve_device, shard
from training.initialization import input_scale
from training.lockstep import drain
from training.member import Member
from training.metrics import MetricsLogger, to_float, truncate_metrics
from training.resampling import ResampleSample
from training.run_folder import run_config, write_run_config
from training.signals import StopOnSignal
from training.sweep import check_sweep

if TYPE_CHECKING:
    from training.kl_finetune import KLPhase

logger = logging.getLogger(__name__)

Evaluator = Callable[[Dictionary, float, float], dict[str, float]]
"""Held-out evaluation of a dictionary, its input scale and its output scale (the input's for a
sparse autoencoder; training.heldout.HeldOutEval)."""


@dataclass
class TrainResult:
    """What a run produced."""

    out_dir: Path
    dictionaries: dict[str, Dictionary]
    """Final dictionaries (input scale folded, saved form), by member name."""
    paths: dict[str, Path]
    """Where each dictionary was saved (empty on non-main processes and when interrupted)."""
    steps: int
    tokens: int
    interrupted: bool
    """True if a signal stopped the run (a checkpoint was written; resume to continue)."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Last logged metrics of each member."""

    @property
    def dictionary(self) -> Dictionary:
        """The only dictionary of a single-member run."""
        if len(self.dictionaries) != 1:
            raise ValueError(f"{len(self.dictionaries)} dictionaries; index .dictionaries")
        return next(iter(self.dictionaries.values()))


class Trainer:
    """Trains one dictionary, or a sweep of them on the same batches (one config each)."""

    def __init__(
        self,
        cfg: TrainConfig | Sequence[TrainConfig],
        d_in: int,
        *,
        names: Sequence[str] | None = None,
        evaluator: Evaluator | None = None,
        resume: bool = False,
        stop: StopOnSignal | None = None,
        progress: bool = True,
        kl_phase: KLPhase | None = None,
        d_out: int | None = None,
    ) -> None:
        cfgs = [cfg] if isinstance(cfg, TrainConfig) else list(cfg)
        if not cfgs:
            raise ValueError("no configs to train")
        check_sweep(cfgs)
        names = (
            list(names)
            if names
            else (["dictionary"] if len(cfgs) == 1 else [f"m{i}" for i in range(len(cfgs))])
        )
        if len(set(names)) != len(cfgs):
            raise ValueError("member names must be unique, one per config")
        self.cfg = cfgs[0]
        self.cfgs = cfgs
        self.d_in = d_in
        self.d_out = d_out
        """A transcoder's target width: batches are then [batch, d_in + d_out] pairs."""
        self.width = d_in + (d_out or 0)
        self.resume = resume
        self.evaluator = evaluator
        self.out_dir = Path(self.cfg.out_dir)
        requested = self.cfg.device
        self.dist = init_from_env(
            "cuda"
            if requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
            else "cpu"
        )
        self.device = resolve_device(requested, self.dist)
        self.members = [
            Member(n, c, d_in, self.device, self.dist, d_out)
            for n, c in zip(names, cfgs, strict=True)
        ]
        self.step = 0
        self.tokens = 0
        self.input_scale = 1.0
        self.output_scale = 1.0
        self._consumed = 0
        self._pending: list[Tensor] = []
        self._sample = ResampleSample.for_configs(cfgs)
        self._stop = stop or StopOnSignal()
        self._show_progress = progress
        self._last: dict[str, dict[str, float]] = {}
        self._log = MetricsLogger(self.out_dir, enabled=False)
        self.kl_phase = kl_phase
        """Run after the main loop (training/kl_finetune.py): single process only."""
        if kl_phase is not None and self.dist.enabled:
            raise UserError("KL fine-tuning runs in a single process, not under torchrun")
        if kl_phase is not None and d_out is not None:
            raise UserError("KL fine-tuning splices a sparse autoencoder at its own hook; "
                            "a transcoder trains without --kl-finetune.tokens")  # fmt: skip

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, batches: BatchSource) -> TrainResult:
        return drain(self.run(batches))

    def run(self, batches: BatchSource) -> Generator[int, None, TrainResult]:
        """`fit` in steps (training/lockstep.py): yields after the start and every step."""
        it = self._start(batches)
        try:
            yield self.step
            with self._stop, self._progress() as bar:
                while self.tokens < self.cfg.total_tokens:
                    x = self._next_batch(it)
                    if x is None:
                        break
                    self._train_step(x, bar)
                    if self.stop_requested():
                        logger.warning(
                            "signal %s: saving a checkpoint and stopping", self._stop.signum
                        )
                        self._checkpoint(batches)
                        return self._result(interrupted=True, dictionaries={}, paths={})
                    if (every := self.cfg.checkpoint_every_steps) and self.step % every == 0:
                        self._checkpoint(batches)
                    yield self.step
                self._checkpoint(batches)  # with a KL phase, a resume starts it over from here
                if self.kl_phase is not None:
                    bar.total = self.tokens + self.cfg.kl_finetune.tokens
                    if not self.kl_phase.run(self, bar):
                        return self._result(interrupted=True, dictionaries={}, paths={})
            return self._finish()
        finally:
            self._log.close()
            if isinstance(it, Generator):
                it.close()  # stops the source's prefetch thread now, not at interpreter exit

    # -- named steps ---------------------------------------------------------------------------
    def _start(self, batches: BatchSource) -> Iterator[Tensor]:
        """Restore from the checkpoint, or read the initial sample and initialise."""
        main = self.dist.is_main
        if self.resume:
            state = load_checkpoint(self.out_dir)
            it = self._restore(state, batches)
            if main:
                truncate_metrics(self.out_dir, self.step)
            logger.info("resumed at step %d (%d tokens)", self.step, self.tokens)
        else:
            it = iter(batches)
            self._initialize(it)
            if main:
                self._write_config()
        self._log = MetricsLogger(
            self.out_dir,
            enabled=main,
            wandb_project=self.cfg.logging.wandb_project if self.cfg.logging.wandb else None,
            config=self._config_dict(),
            resume=self.resume,
        )
        return it

    def _initialize(self, it: Iterator[Tensor]) -> None:
        """Input scale and b_dec from the first init_tokens tokens (which are then trained on)."""
        need = self.cfg.dictionary.init_tokens
        have = 0
        while have < need:
            x = next(it, None)
            if x is None:
                break
            x = self._check(x)
            self._consumed += 1
            self._pending.append(x)
            have += x.shape[0]
        if not self._pending:
            raise UserError("the activation source yielded no batches")
        sample = torch.cat(self._pending)[:need].to(self.device, torch.float32)
        self.input_scale = input_scale(sample[:, : self.d_in])
        self.output_scale = (
            input_scale(sample[:, self.d_in :]) if self.d_out is not None else self.input_scale
        )
        for m in self.members:
            m.initialize(sample, self.input_scale, self.output_scale)

    def _next_batch(self, it: Iterator[Tensor]) -> Tensor | None:
        if self._pending:
            return self._pending.pop(0)
        x = next(it, None)
        if x is None:
            logger.info("the activation source ended after %d tokens", self.tokens)
            return None
        self._consumed += 1
        return self._check(x)

    def _check(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[-1] != self.width:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            want = f"{self.d_in} + {self.d_out}" if self.d_out is not None else f"{self.d_in}"
            raise UserError(f"expected activation batches of shape [batch, {want}], got {shape}")
        return x

    def _train_step(self, x: Tensor, bar: Any) -> None:
        """Every member on this batch, then counters, logging, resampling and evals."""
        self._sample.add(x, self.tokens)
        x = x.to(self.device, torch.float32, non_blocking=True)
        local = shard(x, self.dist)
        n = x.shape[0]
        step, before = self.step, self.tokens
        last = step + 1 >= self.cfg.total_steps
        log_now = (step + 1) % self.cfg.logging.log_every_steps == 0 or last
        rows = {m.name: m.train_step(local, step, n, log_now, before) for m in self.members}
        self.step += 1
        self.tokens += n
        bar.update(n)
        for m in self.members:
            m.maybe_resample(before, self.tokens, self._sample)
        self._sample.release(before, self.tokens)
        if log_now:
            self.log_rows(rows, bar)
        every = self.cfg.logging.eval_every_steps
        if self.evaluator is not None and every and self.step % every == 0 and self.dist.is_main:
            for m in self.members:
                self._log_eval(m.name, self.evaluator(m.dictionary, m.scale, m.out_scale))

    def log_rows(self, rows: dict[str, dict[str, Any]], bar: Any) -> None:
        multi = len(self.members) > 1
        for m in self.members:
            row = {k: to_float(v) for k, v in rows[m.name].items()}
            row.update(m.log_row(self.cfg.logging.dense_threshold))
            self._last[m.name] = row
            self._log.log({"step": self.step, "tokens": self.tokens, **row}, m.name, multi)
        first = self._last[self.members[0].name]
        density = "dead_fraction" if "dead_fraction" in first else "density_tokens"
        keys = ("loss", "l0", "fvu", density)  # density_tokens: the window is not full yet
        bar.set_postfix({k: f"{first[k]:.3g}" for k in keys if k in first}, refresh=False)

    def _log_eval(self, member: str, values: dict[str, float]) -> None:
        row = {f"eval/{k}": float(v) for k, v in values.items()}
        self._last.setdefault(member, {}).update(row)
        self._log.log(
            {"step": self.step, "tokens": self.tokens, **row}, member, len(self.members) > 1
        )

    def _finish(self) -> TrainResult:
        """Fold, save, plot, final evals."""
        dictionaries: dict[str, Dictionary] = {}
        paths: dict[str, Path] = {}
        for m in self.members:
            d = m.final_dictionary(self.tokens)
            dictionaries[m.name] = d
            if self.dist.is_main:
                if self.evaluator is not None:
                    # The saved dictionary carries its held-out figures (sae.evaluation).
                    figures = self.evaluator(d, 1.0, 1.0)
                    source = getattr(self.evaluator, "source", None)
                    d.cfg.provenance = {**d.cfg.provenance, "eval": figures,
                                        **({"eval_source": source} if source else {})}  # fmt: skip
                    self._log_eval(m.name, figures)
                paths[m.name] = self.out_dir / m.name
                d.save(paths[m.name])
        if self.dist.is_main:
            densities = {m.name: dens for m in self.members
                         if (dens := m.density.current(partial=True)) is not None}  # fmt: skip
            for name, density in densities.items():
                self._log.log_histogram(name, density, self.step, len(self.members) > 1)
            if self.cfg.logging.plots:
                from training.plots import draw_frontier, draw_plots

                draw_plots(self.out_dir, densities)
                draw_frontier(
                    self.out_dir,
                    {n: d.cfg.provenance["eval"] for n, d in dictionaries.items()
                     if "eval" in d.cfg.provenance},
                )  # fmt: skip
        return self._result(interrupted=False, dictionaries=dictionaries, paths=paths)

    def _result(self, interrupted: bool, dictionaries: dict, paths: dict) -> TrainResult:
        return TrainResult(
            self.out_dir, dictionaries, paths, self.step, self.tokens, interrupted, dict(self._last)
        )

    # -- checkpoints ---------------------------------------------------------------------------
    def _checkpoint(self, batches: BatchSource) -> None:
        if not self.dist.is_main:
            return
        save_checkpoint(
            self.out_dir,
            {
                "step": self.step,
                "tokens": self.tokens,
                "input_scale": self.input_scale,
                "output_scale": self.output_scale,
                "members": {m.name: m.state_dict() for m in self.members},
                "data_state": (
                    batches.state_dict() if isinstance(batches, ResumableSource) else None
                ),
                "consumed_batches": self._consumed,
                "pending": [t.cpu() for t in self._pending],
                "sample": self._sample.state_dict(),
                "rng": rng_state(),
                "last_metrics": self._last,
            },
        )

    def _restore(self, state: dict[str, Any], batches: BatchSource) -> Iterator[Tensor]:
        names = {m.name for m in self.members}
        if set(state["members"]) != names:
            raise UserError(
                f"checkpoint members {sorted(state['members'])} != this run's {sorted(names)}"
            )
        for m in self.members:
            m.load_state_dict(state["members"][m.name])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.input_scale = float(state["input_scale"])
        self.output_scale = float(state.get("output_scale", self.input_scale))
        self._consumed = int(state["consumed_batches"])
        self._pending = list(state["pending"])
        self._sample.load_state_dict(state["sample"])
        self._last = dict(state.get("last_metrics", {}))
        set_rng_state(state["rng"])
        if state["data_state"] is not None and isinstance(batches, ResumableSource):
            batches.load_state_dict(state["data_state"])
            return iter(batches)
        # A source without state: replay it and skip what was consumed (exact if deterministic).
        logger.warning(
            "data source has no state_dict(); skipping %d batches to resume", self._consumed
        )
        it = iter(batches)
        for _ in range(self._consumed):
            if next(it, None) is None:
                break
        return it

    # -- plumbing ------------------------------------------------------------------------------
    def _config_dict(self) -> dict[str, Any]:
        return run_config([m.name for m in self.members], [m.cfg for m in self.members])

    def _write_config(self) -> None:
        write_run_config(self.out_dir, self.members, self._config_dict(), {
            "d_in": self.d_in, "input_scale": self.input_scale,
            **({"d_out": self.d_out, "output_scale": self.output_scale} if self.d_out else {}),
            "world_size": self.dist.world_size, "device": str(self.device),
        })  # fmt: skip

    def stop_requested(self) -> bool:
        local = self._stop.signum is not None
        if not self.dist.enabled:
            return local
        # Every process must stop at the same step, or the all-reduces would hang.
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        return bool(all_reduce_(flag, self.dist, op="max").item() > 0)

    def _progress(self) -> Any:
        from sae.progress import progress_bar

        return progress_bar(
            total=self.cfg.total_steps * self.cfg.batch_size,  # tokens/s is the rate shown
            initial=self.tokens,
            unit="tok",
            unit_scale=True,
            desc="train",
            disable=not (self.cfg.logging.progress and self._show_progress and self.dist.is_main),
            dynamic_ncols=True,
        )


def train_sweep(
    cfgs: Sequence[TrainConfig],
    d_in: int,
    batches: BatchSource,
    names: Sequence[str] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train several dictionaries on the same batches in one pass over the activations."""
    return Trainer(cfgs, d_in, names=names, resume=resume).fit(batches)
