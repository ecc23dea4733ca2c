"""Several trainers on one pass over the data, one step each per round, in the main thread.

Training from a model trains one dictionary (or sweep) per hook from the same forward passes:
each hook has its own `Trainer` and run folder, and this driver advances them together
(`Trainer.run` yields after every step), which keeps three things true:
- the shared producer's per-hook queues stay a few batches deep (no trainer runs ahead);
- under torchrun every process issues the same collectives in the same order (threads, one
  per trainer, would interleave their all-reduces differently on each process);
- a signal stops every trainer after the same step: they see one stop flag, copied from the
  real signal handler between rounds, so their checkpoints agree on the data position.

A trainer whose source is ahead of the others (a crash between writing one hook's checkpoint
and the next) waits until they catch up, so the shared stream restarts at the earliest one.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from training.signals import StopOnSignal

if TYPE_CHECKING:
    from training.trainer import Trainer, TrainResult

T = TypeVar("T")


def drain(run: Generator[Any, None, T]) -> T:
    """Run a generator to its end and return what it returns."""
    while True:
        try:
            next(run)
        except StopIteration as done:
            return done.value


class LatchedStop(StopOnSignal):
    """The stop flag lockstep trainers share: installs no handler; the driver sets `signum`
    between rounds from the real `StopOnSignal`."""

    def __enter__(self) -> LatchedStop:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def fit_together(
    trainers: Sequence[Trainer],
    sources: Sequence[Any],
    stop: LatchedStop,
    position: Callable[[Any], int] = lambda source: 0,
) -> list[TrainResult]:
    """`Trainer.fit` of every trainer on its source, a step of each per round.

    The trainers must have been built with `stop=stop`. `position(source)` is how far a source
    has been read; each round steps only the trainers whose source is furthest behind.
    """
    runs = {i: t.run(s) for i, (t, s) in enumerate(zip(trainers, sources, strict=True))}
    results: dict[int, TrainResult] = {}
    try:
        with StopOnSignal() as signal:
            while runs:
                stop.signum = signal.signum
                low = min(position(sources[i]) for i in runs)
                for i in [i for i in runs if position(sources[i]) <= low]:
                    try:
                        next(runs[i])
                    except StopIteration as done:
                        results[i] = done.value
                        del runs[i]
    finally:
        for run in runs.values():
            run.close()
    return [results[i] for i in range(len(trainers))]
