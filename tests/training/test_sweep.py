"""Sweeps in one pass: every member equals the same dictionary trained alone on the batches."""

from __future__ import annotations

import pytest
import torch

from tests.training.helpers import data, small_cfg, with_
from training.metrics import read_metrics
from training.sweep import expand_grid, parse_sweep
from training.trainer import Trainer, train_sweep


def test_sweep_equals_separate_runs(tmp_path):
    base = small_cfg(tmp_path / "sweep", steps=25)
    grid = parse_sweep(["objective.l1_coefficient=0.1,1.0", "dictionary.d_sae=32,48"])
    assert grid == {"objective.l1_coefficient": [0.1, 1.0], "dictionary.d_sae": [32, 48]}
    members = expand_grid(base, grid)
    assert [n for n, _ in members] == [
        "l1_coefficient=0.1-d_sae=32",
        "l1_coefficient=0.1-d_sae=48",
        "l1_coefficient=1.0-d_sae=32",
        "l1_coefficient=1.0-d_sae=48",
    ]
    source = data()
    swept = train_sweep([c for _, c in members], 16, source, names=[n for n, _ in members])
    assert source.position == 25  # the activations were read once, not once per member
    rows = read_metrics(tmp_path / "sweep")
    for name, cfg in members:
        alone = Trainer(with_(cfg, out_dir=tmp_path / name), d_in=16).fit(data())
        mine = [r["loss"] for r in rows if r["member"] == name]
        assert mine == [r["loss"] for r in read_metrics(tmp_path / name)]
        a, b = alone.dictionary.state_dict(), swept.dictionaries[name].state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
        assert (tmp_path / "sweep" / name / "cfg.json").is_file()


def test_sweep_rejects_run_level_fields_and_unknown_ones(tmp_path):
    with pytest.raises(ValueError, match="cannot be swept"):
        parse_sweep(["batch_size=32,64"])
    with pytest.raises(ValueError, match="unknown sweep field"):
        parse_sweep(["objective.nope=1,2"])
    with pytest.raises(ValueError, match="not one of"):
        parse_sweep(["objective.name=relu_l1,nope"])


def test_sweep_parses_booleans_like_the_flags():
    grid = parse_sweep(["dictionary.normalize_inputs=false,YES", "resample.enabled=none,on"])
    assert grid == {"dictionary.normalize_inputs": [False, True], "resample.enabled": [None, True]}
    with pytest.raises(ValueError, match="expected true/false"):
        parse_sweep(["dictionary.normalize_inputs=ture"])
