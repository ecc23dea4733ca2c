"""`sae cache`: cache hooked activations of a model over a text dataset (see activations/cache.py).

Every option comes from `CacheConfig` / `TextConfig` (nested as --text.*); a YAML or JSON file
given with --config supplies defaults that flags override. Run the same command again to resume
an interrupted cache; under torchrun every rank caches its slice into the same folder.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from activations.cache import CacheConfig
    from sae.dataclass_cli import add_dataclass_args

    parser = subparsers.add_parser(
        "cache",
        help="cache model activations at one or more hooks to sharded files",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML or JSON file of options; flags override it")
    add_dataclass_args(parser, CacheConfig)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from activations.cache import CacheConfig, cache_activations
    from sae.dataclass_cli import dataclass_from_args

    cfg = dataclass_from_args(CacheConfig, args, args.config)
    result = cache_activations(cfg)
    rate = result.new_tokens / result.seconds if result.seconds > 0 else 0.0
    print(
        f"cached {result.n_tokens} tokens x {len(result.hook_dirs)} hook(s) in {result.path} "
        f"({result.new_tokens} new, {rate:,.0f} tokens/s)"
    )
    for name, folder in result.hook_dirs.items():
        print(f"  {name}: {folder}")
    return 0
