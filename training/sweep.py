"""Sweeps in one pass: a grid of configs whose dictionaries train on the same batches.

    grid = parse_sweep(["objective.l1_coefficient=1,3,10", "dictionary.d_sae=512,1024"])
    members = expand_grid(base_cfg, grid)        # 6 (name, TrainConfig) pairs
    train_sweep([c for _, c in members], d_in, batches, names=[n for n, _ in members])

Reading activations is usually the bottleneck, so training N dictionaries at once costs far
less than N runs. Only per-dictionary options may vary (not batch size, run length, device...).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import typing
from collections.abc import Sequence
from typing import Any

from sae.dataclass_cli import parse_bool
from sae.errors import UserError
from training.config import RUN_LEVEL_FIELDS, TrainConfig


def _convert(text: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Literal:
        if text not in args:
            raise ValueError(f"{text!r} is not one of {', '.join(map(str, args))}")
        return text
    if origin is not None and len(args) == 1:  # Optional[X]
        if text.lower() == "none":
            return None
        return _convert(text, args[0])
    if tp is bool:
        # The flags' parser, so a typo ("ture") is refused instead of silently meaning False.
        try:
            return parse_bool(text)
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None
    if tp in (int, float, str):
        return tp(text)
    raise ValueError(f"cannot sweep over a field of type {tp}")


def _field_type(path: str) -> Any:
    cls: Any = TrainConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ValueError(f"unknown sweep field {path!r}")
        tp = hints[part]
        if i < len(parts) - 1:
            if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
                raise ValueError(f"{'.'.join(parts[: i + 1])} is not a section in {path!r}")
            cls = tp
    return tp


def parse_sweep(specs: list[str]) -> dict[str, list[Any]]:
    """`["objective.k=16,32"]` -> {"objective.k": [16, 32]}, values typed by the config."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not values:
            raise ValueError(f"sweep {spec!r} must look like field=v1,v2")
        if key.split(".")[0] in RUN_LEVEL_FIELDS:
            raise ValueError(f"{key} is shared by every dictionary of a pass; it cannot be swept")
        tp = _field_type(key)
        grid[key] = [_convert(v.strip(), tp) for v in values.split(",")]
    return grid


def _replace(cfg: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(cfg, **{path[0]: value})
    inner = _replace(getattr(cfg, path[0]), path[1:], value)
    return dataclasses.replace(cfg, **{path[0]: inner})


def expand_grid(base: TrainConfig, grid: dict[str, list[Any]]) -> list[tuple[str, TrainConfig]]:
    """Every combination of the grid applied to `base`, named by what it sets."""
    if not grid:
        return [("dictionary", base)]
    keys = list(grid)
    out = []
    for values in itertools.product(*(grid[k] for k in keys)):
        cfg = base
        for key, value in zip(keys, values, strict=True):
            cfg = _replace(cfg, key.split("."), value)
        name = "-".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values, strict=True))
        out.append((name, cfg))
    return out


def check_sweep(cfgs: Sequence[TrainConfig]) -> None:
    """Members of one pass must agree on everything that describes the pass itself."""
    for c in cfgs[1:]:
        for name in RUN_LEVEL_FIELDS:
            if getattr(c, name) != getattr(cfgs[0], name):
                raise UserError(f"sweep members differ in run-level option {name!r}")
        if c.dictionary.init_tokens != cfgs[0].dictionary.init_tokens:
            raise UserError("sweep members differ in run-level option 'dictionary.init_tokens'")
        if c.transcoder.target != cfgs[0].transcoder.target:  # the batches are its pairs
            raise UserError("sweep members differ in run-level option 'transcoder.target'")
