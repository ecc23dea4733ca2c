"""Device options (bf16 autocast, torch.compile on CUDA) and W&B offline logging."""

from __future__ import annotations

import pytest
import torch

from tests.training.helpers import data, small_cfg, with_
from training.metrics import read_metrics
from training.trainer import Trainer


def test_bf16_autocast_trains_with_float32_weights(tmp_path):
    cfg = with_(small_cfg(tmp_path, steps=30), autocast="bf16")
    trainer = Trainer(cfg, d_in=16)
    result = trainer.fit(data())
    fvu = [r["fvu"] for r in read_metrics(tmp_path)]
    assert fvu[-1] < 0.5 * fvu[0]
    assert trainer.members[0].dictionary.W_enc.dtype == torch.float32
    assert result.dictionary.dtype == torch.float32


def test_auto_autocast_is_bf16_exactly_where_the_device_has_bf16_matmuls(tmp_path, monkeypatch):
    import training.member

    for native in (True, False):
        monkeypatch.setattr(training.member, "native_bf16", lambda device, n=native: n)
        trainer = Trainer(with_(small_cfg(tmp_path / str(native), steps=5), autocast="auto"), 16)
        assert trainer.members[0].bf16 is native
    plain = Trainer(small_cfg(tmp_path / "plain", steps=5), 16)
    assert plain.members[0].bf16 is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compiled_bf16_run_matches_the_eager_float32_run(tmp_path):
    eager = Trainer(with_(small_cfg(tmp_path / "a", steps=30), device="cuda"), d_in=16).fit(data())
    fast_cfg = with_(
        small_cfg(tmp_path / "b", steps=30), device="cuda", compile=True, autocast="bf16"
    )
    fast = Trainer(fast_cfg, d_in=16).fit(data())
    a = [r["loss"] for r in read_metrics(tmp_path / "a")]
    b = [r["loss"] for r in read_metrics(tmp_path / "b")]
    assert b[-1] == pytest.approx(a[-1], rel=0.1)
    assert fast.dictionary.W_dec.is_cuda and eager.dictionary.W_dec.is_cuda


@pytest.mark.slow
def test_wandb_offline_run_needs_no_account(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = small_cfg(tmp_path, steps=6)
    cfg = with_(cfg, logging=with_(cfg.logging, wandb=True, wandb_project="sae-test"))
    Trainer(cfg, d_in=16).fit(data())
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(runs[0].glob("*.wandb"))  # the offline log `wandb sync` would upload
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert runs[0].name.endswith(run_id)
