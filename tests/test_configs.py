"""The shipped recipe configs must parse into the typed configs the CLIs use: a typo in a
field name or a wrong type would otherwise surface only on a user's GPU box."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from activations.cache import CacheConfig
from sae.dataclass_cli import from_dict, load_config_file
from training.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/cache.yaml")), ids=lambda p: p.parent.name)
def test_cache_recipe_parses(path: Path) -> None:
    cfg = from_dict(CacheConfig, load_config_file(path))
    assert cfg.hooks and cfg.max_tokens and cfg.max_tokens > 0


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/train.yaml")), ids=lambda p: p.parent.name)
def test_train_recipe_parses(path: Path) -> None:
    cfg = from_dict(TrainConfig, load_config_file(path))
    assert cfg.total_tokens > 0
    assert cfg.dictionary.hook_name  # recorded in the saved dictionary's cfg.json


def test_recipes_exist() -> None:
    assert list(CONFIGS.glob("*/cache.yaml")) and list(CONFIGS.glob("*/train.yaml"))


def test_unknown_field_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "train.yaml"
    bad.write_text("total_tokens: 10\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        from_dict(TrainConfig, load_config_file(bad))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/stream*.yaml")), ids=lambda p: p.name)
def test_stream_recipe_parses(path: Path) -> None:
    """A streaming recipe holds the train options and the stream options (model, hooks, text)
    in one file, split as `sae train --config` splits it."""
    from training.stream_source import StreamConfig

    data = load_config_file(path)
    stream_keys = {f.name for f in dataclasses.fields(StreamConfig)}
    scfg = from_dict(StreamConfig, {k: v for k, v in data.items() if k in stream_keys})
    cfg = from_dict(TrainConfig, {k: v for k, v in data.items() if k not in stream_keys})
    assert scfg.model and scfg.hooks and cfg.total_tokens > 0
    assert cfg.batch_size % 8 == 0  # splits over the torchrun example's 8 processes
