"""Streaming under torchrun: a real 2-process gloo run on CPU where each rank streams its own
shard of the text; it trains exactly what one process trains on the gathered global batches
(rank 0's rows, then rank 1's). relu_l1, whose loss is a plain mean over the batch: the
topk objectives normalise by the batch's variance, which each rank takes over its own rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from activations.model import load_model
from activations.stream import StreamedActivations
from sae.base import Dictionary
from tests.helpers import make_docs
from training.config import (
    DictionaryShape,
    EvalConfig,
    LoggingConfig,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
)
from training.metrics import read_metrics
from training.stream_source import StreamConfig, heldout_contexts
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
MLP, RESID = "blocks.0.mlp.hook_post", "blocks.0.hook_resid_post"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("one_torch_thread")
def test_two_ranks_stream_their_own_shards_and_train_the_gathered_batches(tiny_lm_dir, tmp_path):
    docs = make_docs(tmp_path / "docs", 80)
    out = tmp_path / "ddp"
    argv = [
        "--model", str(tiny_lm_dir), "--hooks", MLP, RESID, "--text.dataset", str(docs),
        "--text.context-size", "16", "--text.batch-size", "4", "--buffer-tokens", "120",
        "--total-tokens", "1280", "--batch-size", "64", "--dictionary.d-sae", "32",
        "--dictionary.init-tokens", "128", "--objective.name", "relu_l1", "--objective.l1-coefficient", "0.3",
        "--optim.warmup-steps", "2", "--eval.tokens", "120", "--eval.loss-recovered", "false",
        "--out-dir", str(out), "--device", "cpu", "--logging.plots", "false",
        "--logging.progress", "false", "--logging.log-every-steps", "1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "sae.cli", "train", *argv,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for hook in (MLP, RESID):
        assert Dictionary.load(out / hook / "dictionary").cfg.hook_name == hook

    # The same run in one process, fed the global batches the two ranks gathered.
    scfg = StreamConfig(buffer_tokens=120)
    scfg.text.dataset, scfg.text.context_size, scfg.text.batch_size = str(docs), 16, 4
    _, skip = heldout_contexts(scfg, 120)
    model = load_model(str(tiny_lm_dir))
    ranks = [
        list(
            StreamedActivations(model, MLP, scfg.text, 32, mix_passes=scfg.mix_passes(), rank=r,
                                world_size=2, skip_contexts=skip)
        )
        for r in (0, 1)
    ]  # fmt: skip
    batches = [torch.cat(pair) for pair in zip(*ranks, strict=False) if len(pair[1]) == 32]
    cfg = TrainConfig(
        total_tokens=1280,
        batch_size=64,
        out_dir=tmp_path / "one",
        device="cpu",
        dictionary=DictionaryShape(d_sae=32, init_tokens=128, hook_name=MLP),
        objective=ObjectiveConfig(name="relu_l1", l1_coefficient=0.3),
        optim=OptimConfig(warmup_steps=2),
        eval=EvalConfig(tokens=120, loss_recovered=False),
        logging=LoggingConfig(log_every_steps=1, progress=False, plots=False),
    )
    Trainer(cfg, d_in=64).fit(batches)
    ref = [r["loss"] for r in read_metrics(tmp_path / "one") if "loss" in r]
    got = [r["loss"] for r in read_metrics(out / MLP) if "loss" in r]
    assert len(got) == len(ref) == 20
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)
