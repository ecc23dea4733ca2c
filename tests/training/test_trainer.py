"""The fit loop end to end on tiny synthetic data: every objective trains, the saved dictionary
acts on raw activations, resume is exact, bad input is a one-line UserError."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from sae.base import Dictionary
from sae.errors import UserError
from tests.training.helpers import InterruptAt, data, small_cfg, with_
from training.checkpoint import checkpoint_path
from training.config import LoggingConfig
from training.evals import evaluate
from training.metrics import read_metrics
from training.objectives import OBJECTIVES
from training.trainer import Trainer


def losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir) if "loss" in r]


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_trains_and_saves_a_folded_dictionary(tmp_path, objective):
    batch_topk = objective in ("batchtopk", "matryoshka_batchtopk")
    extra: dict = {"k": 4} if objective == "topk_auxk" or batch_topk else {}
    if batch_topk:
        extra["threshold_lr"] = 0.1  # a short run: let the threshold estimate keep up
    if objective == "jumprelu":
        extra = {"l1_coefficient": 0.05, "jumprelu_init_threshold": 0.05}
    cfg = small_cfg(tmp_path / objective, steps=60, name=objective, **extra)
    trainer = Trainer(cfg, d_in=16)
    result = trainer.fit(data())
    member = trainer.members[0]

    # It learned something: reconstruction beats the first steps by a wide margin.
    rows = [r for r in read_metrics(cfg.out_dir) if "fvu" in r]
    assert rows[-1]["fvu"] < 0.5 * rows[0]["fvu"], (rows[0]["fvu"], rows[-1]["fvu"])

    # The saved dictionary acts on raw activations: the training-space module on scaled
    # inputs, divided by the scale, gives the same reconstruction (scale folded on save).
    saved = Dictionary.load(result.paths["dictionary"])
    x = data().batch(999)
    if batch_topk:
        # Saved for inference as a jumprelu with the estimated threshold on every feature.
        assert saved.cfg.architecture == "jumprelu"
        thr = saved.get_parameter("threshold").detach()
        assert float(thr.min()) == float(thr.max()) > 0
        assert saved.cfg.provenance["trained_as"] == objective
        assert evaluate(saved, [x]).fvu < 0.5
    else:
        with torch.no_grad():
            ref = member.dictionary(x * member.scale).x_hat / member.scale
            assert torch.allclose(saved(x).x_hat, ref, atol=1e-4, rtol=1e-4)
    assert member.scale != 1.0
    assert saved.cfg.normalization["folded_input_scale"] == pytest.approx(member.scale)
    assert saved.cfg.provenance["objective"] == objective
    if OBJECTIVES[objective].unit_norm_decoder or objective == "relu_l1_2024":
        norms = saved.W_dec.norm(dim=-1) * member.scale  # rows were unit before the scale fold
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-4)


def test_run_folder_has_config_metrics_checkpoint_and_plots(tmp_path):
    cfg = small_cfg(tmp_path, steps=12)
    cfg = with_(cfg, logging=LoggingConfig(log_every_steps=4, progress=False, plots=True))
    Trainer(cfg, d_in=16).fit(data())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["objective"]["name"] == "relu_l1"
    assert config["resolved"]["members"]["dictionary"]["d_sae"] == 64
    assert config["resolved"]["input_scale"] > 0
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == [4, 8, 12]
    assert checkpoint_path(tmp_path).is_file()
    for name in ("loss.png", "l0.png", "fvu.png", "feature_density.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("objective", "signum"), [("relu_l1", signal.SIGINT), ("topk_auxk", signal.SIGTERM)]
)
def test_resume_after_a_signal_equals_an_uninterrupted_run(tmp_path, objective, signum):
    extra = {"k": 4, "dead_tokens": 256} if objective == "topk_auxk" else {}
    base = small_cfg(tmp_path / "a", steps=30, name=objective, **extra)
    # Resampling every 8 batches with a short window, from a sample of random rows of each
    # batch, so the checkpoint must carry the partial sample and its generator, the firing
    # counters and the resampling generator to continue identically.
    resample = with_(base.resample, enabled=True, every_tokens=512, window_tokens=256)
    base = with_(base, resample=with_(resample, stop_fraction=0.9, sample_tokens=96))
    straight = Trainer(base, d_in=16).fit(data())
    assert not straight.interrupted

    cfg = with_(base, out_dir=tmp_path / "b")
    first = Trainer(cfg, d_in=16).fit(InterruptAt(data(), at=11, signum=signum))
    assert first.interrupted and first.steps < 30
    resumed = Trainer(cfg, d_in=16, resume=True).fit(InterruptAt(data(), at=-1))
    assert not resumed.interrupted and resumed.steps == 30

    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    # The density window and the resampling events continue exactly too.
    keys = ("density_tokens", "dead_fraction", "resample/dead", "resample/revived")
    rows_a, rows_b = (
        [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / p) if "loss" in r]
        for p in "ab"
    )
    assert rows_b == rows_a
    assert all(any(r[k] is not None for r in rows_a) for k in keys[:3])
    a, b = straight.dictionary.state_dict(), resumed.dictionary.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(small_cfg(tmp_path), d_in=16, resume=True).fit(data())


def test_batches_of_the_wrong_width_are_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"shape \[batch, 16\]"):
        Trainer(small_cfg(tmp_path), d_in=16).fit([torch.zeros(64, 8)])


def test_target_l0_steers_the_coefficient(tmp_path):
    cfg = small_cfg(tmp_path, steps=250, l1_coefficient=0.05, target_l0=5.0, target_l0_rate=0.03)
    result = Trainer(cfg, d_in=16).fit(data())
    l0 = [r["l0"] for r in read_metrics(tmp_path) if "l0" in r]
    assert l0[20] > 15  # the starting coefficient is far too weak for L0 = 5
    assert abs(sum(l0[-30:]) / 30 - 5.0) < 1.0
    assert result.dictionary.cfg.provenance["l1_coefficient"] > 1.0


def test_evaluator_runs_every_eval_steps_and_at_the_end(tmp_path):
    cfg = small_cfg(tmp_path, steps=12)
    cfg = with_(cfg, logging=with_(cfg.logging, eval_every_steps=5))
    seen: list[tuple[int, float]] = []

    def evaluator(d, scale, output_scale):
        x = data().batch(123)
        seen.append((d.d_sae, scale))
        return {"fvu_raw": evaluate(d, [x]).fvu if scale == 1.0 else -1.0}

    trainer = Trainer(cfg, d_in=16, evaluator=evaluator)
    trainer.fit(data())
    scale = trainer.members[0].scale
    # Live dictionary in training space at steps 5 and 10, the saved (folded) one at the end.
    assert seen == [(64, scale), (64, scale), (64, 1.0)]
    rows = [r for r in read_metrics(tmp_path) if "eval/fvu_raw" in r]
    assert [r["step"] for r in rows] == [5, 10, 12]
    assert rows[0]["eval/fvu_raw"] == -1.0 and rows[-1]["eval/fvu_raw"] > 0
