"""Small shared builders for the training tests: tiny shapes, real components."""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import Tensor

from training.config import (
    DictionaryShape,
    LoggingConfig,
    ObjectiveConfig,
    OptimConfig,
    ResampleConfig,
    TrainConfig,
)
from training.synthetic import SyntheticActivations, SyntheticConfig

SYN = SyntheticConfig(d_in=16, n_features=48, p_min=0.02, p_max=0.1, seed=3)


def small_cfg(out_dir: Path, steps: int = 40, batch: int = 64, **objective: Any) -> TrainConfig:
    return TrainConfig(
        total_tokens=steps * batch,
        batch_size=batch,
        out_dir=out_dir,
        checkpoint_every_steps=0,
        dictionary=DictionaryShape(d_sae=64, init_tokens=4 * batch),
        objective=ObjectiveConfig(**{"name": "relu_l1", "l1_coefficient": 0.3, **objective}),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        resample=ResampleConfig(),
        logging=LoggingConfig(log_every_steps=1, progress=False, plots=False),
    )


def with_(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)


def data(batch: int = 64, syn: SyntheticConfig = SYN) -> SyntheticActivations:
    return SyntheticActivations(syn, batch_size=batch)


class InterruptAt:
    """A data source that sends this process `signum` when yielding batch `at` (0-based), as
    Ctrl-C (SIGINT) or a scheduler (SIGTERM) would mid-run; state is the wrapped source's."""

    def __init__(self, source: SyntheticActivations, at: int, signum: int = signal.SIGINT) -> None:
        self.source = source
        self.at = at
        self.signum = signum

    def __iter__(self) -> Iterator[Tensor]:
        for x in self.source:
            if self.source.position - 1 == self.at:
                os.kill(os.getpid(), self.signum)
            yield x

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)


def ddp_cfg(out_dir: Path) -> TrainConfig:
    """The run compared across 1 and 2 processes (resampling on, so it is exercised too)."""
    cfg = small_cfg(out_dir, steps=30)
    return with_(
        cfg,
        resample=with_(
            cfg.resample, enabled=True, every_tokens=640, window_tokens=320, stop_fraction=0.8
        ),
    )
