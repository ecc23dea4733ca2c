"""`sae train-lm`: train the bundled one-layer language model from scratch (lm/train.py).

Every option comes from `TrainLMConfig` (lm/config.py); --config takes them from a YAML or
JSON file, and flags override it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from lm.config import TrainLMConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from sae.dataclass_cli import add_dataclass_args

    parser: argparse.ArgumentParser = subparsers.add_parser(
        "train-lm",
        help="train the bundled one-layer language model from scratch on the stdlib corpus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML or JSON config file")
    add_dataclass_args(parser, TrainLMConfig)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from sae.dataclass_cli import dataclass_from_args

    cfg = dataclass_from_args(TrainLMConfig, args, args.config)
    command = shlex.join(["sae", *sys.argv[1:]]) if sys.argv[1:] else "sae train-lm"
    from lm.train import run_training

    metrics = run_training(cfg, command=command)
    print(
        f"val CE {metrics['val_ce_nats_per_token']:.3f} nats/token, unigram entropy "
        f"{metrics['unigram_entropy_nats_per_token']:.3f}; wrote {cfg.out}"
    )
    return 0
