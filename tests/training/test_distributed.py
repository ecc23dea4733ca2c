"""Data parallelism: a real `torchrun --nproc_per_node 2` run over gloo on CPU equals one
process within float tolerance (each rank trains on half of every global batch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae.base import Dictionary
from tests.training.helpers import data, ddp_cfg
from training.metrics import read_metrics
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_process_ddp_equals_one_process(tmp_path):
    torch.set_num_threads(1)
    single = Trainer(ddp_cfg(tmp_path / "single"), d_in=16).fit(data(batch=64))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "tests.training.ddp_worker", str(tmp_path / "ddp"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ref = [r["loss"] for r in read_metrics(tmp_path / "single")]
    got = [r["loss"] for r in read_metrics(tmp_path / "ddp")]
    assert len(got) == len(ref) == 30
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
    resampled = single.dictionary.cfg.provenance["resampled_features"]
    ddp = Dictionary.load(tmp_path / "ddp" / "dictionary")
    assert ddp.cfg.provenance["resampled_features"] == resampled
    for name, value in single.dictionary.state_dict().items():
        assert torch.allclose(ddp.state_dict()[name], value, atol=1e-5, rtol=1e-4), name
