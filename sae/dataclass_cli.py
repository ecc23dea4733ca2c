"""Typed config dataclasses -> argparse, plus YAML/JSON config files with CLI overrides.

One source of truth for every option: the dataclass field (type, default) and the docstring
written under it (the sparsify / simple-parsing convention) become the flag and its help text.
Every subcommand of the `sae` CLI is derived this way: nested dataclasses give
`--text.context-size` flags, booleans take a value (`--compile false`; a bare `--compile` is
true), `--config FILE` is layered under the flags, `--help` shows defaults as they are typed,
and the arguments join a plain argparse subparser, so the lazy dispatcher of sae/cli.py and
hand-written arguments (`--cache`, `--sweep`, positionals) sit beside them.

Why not a library: each was tried on `TrainConfig` and none keeps the flags users type.
- tyro 1.0: booleans become `--compile/--no-compile`; with `FlagConversionOff` it takes only
  `True`/`False`, so `--compile true` exits 2; it reads no config file (a `default=`
  instance only), and its argparse parser is reachable only through the deprecated
  `tyro.extras.get_parser`, not as a subparser of ours.
- simple-parsing 0.1.9 (nested, dash variant): closest on names and `--compile true`, but
  `--help` raises ValueError on a `%` in a field docstring ("the last 20%"), the one-letter
  field k is listed as `-objective.k`, the config flag is `--config_path`, and it needs its
  own ArgumentParser class at the root of the `sae` command.
- jsonargparse 4.53: `--config` layering and `--compile true` work, but flags are
  snake_case (`--total_tokens`, `--dictionary.d_sae`); `--dictionary.d-sae` is rejected.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from sae.errors import UserError

T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written directly under each field of a dataclass, through its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0]
        assert isinstance(body, ast.ClassDef)
        for stmt, nxt in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def parse_bool(text: str) -> bool:
    """1/true/yes/on -> True, 0/false/no/off -> False (any case). Otherwise an
    `argparse.ArgumentTypeError`, whose message argparse prints as is; the server reads its
    boolean environment settings with this too (server/settings.py)."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def field_parser(tp: Any) -> tuple[Any, dict[str, Any]]:
    """(text -> value callable, extra argparse kwargs) for a field type; for a list or tuple
    field the callable parses one item and the kwargs carry `nargs`."""
    tp, optional = _unwrap_optional(tp)
    origin = get_origin(tp)
    if origin is Literal:
        choices = list(get_args(tp))
        return type(choices[0]), {"choices": choices}
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (str,)
        conv, _extra = field_parser(inner)
        return conv, {"nargs": "*" if optional else "+"}
    if tp is bool:
        return parse_bool, {"metavar": "BOOL"}
    if tp in (int, float, str):
        return tp, {}
    if tp is Path:
        return Path, {}
    return str, {}


def shown_default(value: Any) -> str:
    """A default as a user would type it on the command line: `demo_out`, not
    `PosixPath('demo_out')`; `true`; `0.9 0.999` for a list or tuple."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return " ".join(shown_default(v) for v in value) if value else "(none)"
    if isinstance(value, str):
        return value if value else "''"
    return str(value)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one `--flag` per field of `cls` (nested dataclasses get `--outer.inner` flags).

    Defaults are `argparse.SUPPRESS`, so `dataclass_from_args` can tell which options the user
    actually gave and layer them over a config file.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(cls.__name__) if not prefix else parser
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner) and isinstance(inner, type):
            add_dataclass_args(parser, inner, prefix=f"{prefix}{f.name}.")
            continue
        conv, extra = field_parser(tp)
        if conv is parse_bool:
            extra = {**extra, "nargs": "?", "const": True}  # a bare `--verify` means true
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        help_text = docs.get(f.name, "")
        shown = shown_default(default)
        help_text = f"{help_text} (default: {shown})" if help_text else f"default: {shown}"
        group.add_argument(
            f"--{prefix}{f.name}".replace("_", "-"),
            dest=f"{prefix}{f.name}",
            type=conv,
            default=argparse.SUPPRESS,
            help=help_text.replace("%", "%%"),
            **extra,
        )


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a (possibly nested) dataclass from plain data, rejecting unknown keys clearly."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        inner, _ = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(inner) and isinstance(inner, type) and isinstance(value, dict):
            value = from_dict(inner, value)
        elif get_origin(inner) is tuple and isinstance(value, list):
            value = tuple(value)
        elif inner is Path and isinstance(value, str):
            value = Path(value)
        kwargs[key] = value
    return cls(**kwargs)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into plain data."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of options")
    return data


def dataclass_from_args(
    cls: type[T],
    ns: argparse.Namespace,
    config_file: str | Path | None = None,
    base: dict[str, Any] | None = None,
) -> T:
    """Config file (if any; else the options in `base`) first, then the options given on the
    command line. A bad file or value is a UserError, which the `sae` command prints as one
    line."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    given = {k: v for k, v in vars(ns).items() if k.split(".")[0] in names}
    try:
        data = load_config_file(config_file) if config_file else dict(base or {})
        return from_dict(cls, _merge(data, _nest(given)))
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None


def to_dict(obj: Any) -> dict[str, Any]:
    """JSON-ready dict of a (nested) dataclass; Paths become strings, tuples lists."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in dataclasses.asdict(obj).items()}
