"""Run by `torchrun --nproc_per_node 2` in test_distributed.py: the same tiny training run as
the single-process reference, data parallel over gloo on CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.training.helpers import data, ddp_cfg
from training.trainer import Trainer


def main() -> None:
    torch.set_num_threads(1)
    Trainer(ddp_cfg(Path(sys.argv[1])), d_in=16).fit(data(batch=64))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
