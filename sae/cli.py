"""The `sae` command. Each subcommand lives beside the package that owns it and is imported
lazily, so `sae info` never pays for importing a language-model stack.

A subcommand module defines `add_parser(subparsers) -> argparse.ArgumentParser` and sets
`func=run` on it; `run(args)` returns an exit code. `UserError`s become one line on stderr.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from sae.errors import UserError
from sae.progress import quiet_library_bars

# name -> module defining add_parser(); order is the order shown in --help.
SUBCOMMANDS: dict[str, str] = {
    "info": "sae.info_cli",
    "export": "sae.info_cli",
    "train-lm": "lm.cli",
    "cache": "activations.cli",
    "train": "training.cli",
    "analyze": "analysis.cli",
    "compare": "analysis.cli",
    "serve": "server.cli",
    "demo": "sae.demo_cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae", description="Sparse-autoencoder feature dictionaries: cache, train, serve."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen: set[str] = set()
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # that part of the project is not built yet
            raise
        if module_name in seen:
            continue
        seen.add(module_name)
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_library_bars()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"sae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sae {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # A write outside the atomic writers (which name the bytes needed) filled the disk.
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"sae {args.command}: error: no space left on device{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
