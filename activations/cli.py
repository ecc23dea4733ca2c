"""`sae cache`: cache hooked activations of a model over a text dataset (see activations/cache.py).

Every option comes from `CacheConfig` / `TextConfig` (nested as --text.*); a YAML or JSON file
given with --config supplies defaults that flags override. Run the same command again to resume
an interrupted cache, or to check a finished one and rewrite its damaged shards (--verify
checks every checksum too); a cache's own cache_config.json is such a config file:

    sae cache --config activation_cache/cache_config.json --verify

Under torchrun every rank caches its slice into the same folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


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

    base = _own_config(args.config) if args.config else None
    cfg = dataclass_from_args(CacheConfig, args, None if base else args.config, base=base)
    result = cache_activations(cfg)
    rate = result.new_tokens / result.seconds if result.seconds > 0 else 0.0
    if result.repaired:
        print(f"rewrote {len(result.repaired)} damaged shard(s):")
        for line in result.repaired:
            print(f"  {line}")
    elif cfg.verify:
        print("every shard matches its recorded size and checksum")
    print(
        f"cached {result.n_tokens} tokens x {len(result.hook_dirs)} hook(s) in {result.path} "
        f"({result.new_tokens} new, {rate:,.0f} tokens/s)"
    )
    for name, folder in result.hook_dirs.items():
        print(f"  {name}: {folder}")
    return 0


def _own_config(path: str) -> dict[str, Any] | None:
    """The options of a cache's own cache_config.json (None for any other config file)."""
    from activations.cache_folder import options_from_fingerprint
    from activations.cache_format import FORMAT

    file = Path(path)
    if file.suffix != ".json" or not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return options_from_fingerprint(data, file.parent)
