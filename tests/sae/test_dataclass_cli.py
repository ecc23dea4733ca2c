"""The flags generated from config dataclasses: help text as users type, bare booleans."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from sae.cli import SUBCOMMANDS, build_parser
from sae.dataclass_cli import add_dataclass_args, dataclass_from_args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the sae parser has no subcommands")


def test_every_help_shows_defaults_as_typed() -> None:
    parsers = _subparsers(build_parser())
    assert set(parsers) == set(SUBCOMMANDS)
    for name, parser in parsers.items():
        text = parser.format_help()
        assert "PosixPath(" not in text, name
        assert "default: (" not in text.replace("default: (none)", ""), name  # no tuple reprs
        assert "default: '" not in text and "default: True" not in text, name
    assert "(default: demo_out)" in parsers["demo"].format_help()
    helps = parsers["train"].format_help()
    assert "(default: runs/sae)" in helps and "(default: 0.9 0.999)" in helps


@dataclasses.dataclass
class Opts:
    out: Path = Path("out")
    """Folder."""
    verify: bool = False
    """Check everything."""
    hooks: tuple[str, ...] = ("a", "b")
    """Hooks."""


@pytest.mark.parametrize(
    ("argv", "verify"),
    [([], False), (["--verify"], True), (["--verify", "false"], False), (["--verify", "on"], True)],
)
def test_a_bare_boolean_flag_means_true(argv: list[str], verify: bool) -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Opts)
    cfg = dataclass_from_args(Opts, parser.parse_args([*argv, "--out", "x"]))
    assert cfg.verify is verify and cfg.out == Path("x")
    assert "(default: a b)" in parser.format_help()
