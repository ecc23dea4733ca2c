"""Dead-feature resampling (Towards Monosemanticity): the exact re-initialisation, and a
training run that revives features we killed on purpose (and a control run that does not)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sae.base import DictionaryConfig, build
from tests.training.helpers import data, small_cfg, with_
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import (
    DictionaryShape,
    LoggingConfig,
    ObjectiveConfig,
    OptimConfig,
    ResampleConfig,
    TrainConfig,
)
from training.density import FiringTracker
from training.evals import evaluate
from training.metrics import read_metrics
from training.resampling import ResampleSample, crossed, resample_dead_features
from training.trainer import Trainer


def _random_relu(d_in: int, d_sae: int) -> tuple:
    """A relu dictionary with standard-normal weights (seed 0) and an Adam over it."""
    torch.manual_seed(0)
    d = build(DictionaryConfig("relu", d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        for p in d.parameters():
            p.normal_()
    return d, torch.optim.Adam(d.parameters())


def test_resample_sets_rows_from_the_worst_input_and_resets_adam():
    d, opt = _random_relu(4, 6)
    d(torch.randn(8, 4)).x_hat.pow(2).sum().backward()
    opt.step()
    dead = torch.tensor([False, True, False, False, True, False])
    alive_norm = d.W_enc[:, ~dead].norm(dim=0).mean()
    before = {k: v.clone() for k, v in opt.state[d.W_dec].items()}
    alive_sq = {p: opt.state[p]["exp_avg_sq"].clone() for p in (d.W_dec, d.W_enc, d.b_enc)}

    # Three inputs; with b_dec = 0 and b_enc < 0 the dictionary reconstructs x = 0 exactly,
    # so every draw ∝ loss^2 must pick the third input.
    with torch.no_grad():
        d.b_dec.zero_()
        d.b_enc.copy_(-d.b_enc.abs())
        pool = torch.tensor([[0.0] * 4, [0.0] * 4, [3.0, 0.0, 4.0, 0.0]])
        losses = (d(pool).x_hat - pool).pow(2).sum(-1)
    assert losses[:2].max() == 0 < losses[2]
    ids = resample_dead_features(d, opt, dead, pool, torch.Generator().manual_seed(0))

    assert ids.tolist() == [1, 4]
    direction = torch.tensor([0.6, 0.0, 0.8, 0.0])
    for i in (1, 4):
        assert torch.allclose(d.W_dec[i], direction, atol=1e-3)
        assert torch.allclose(d.W_enc[:, i], direction * 0.2 * alive_norm, atol=1e-3)
        assert d.b_enc[i] == 0
        # No stale momentum; the second moment at the alive features' mean, so the first
        # updates have the usual size rather than bias-corrected sign steps.
        assert torch.all(opt.state[d.W_dec]["exp_avg"][i] == 0)
        assert torch.all(opt.state[d.W_enc]["exp_avg"][:, i] == 0)
        assert opt.state[d.b_enc]["exp_avg"][i] == 0
        sq_dec, sq_enc, sq_b = (alive_sq[p] for p in (d.W_dec, d.W_enc, d.b_enc))
        assert torch.allclose(opt.state[d.W_dec]["exp_avg_sq"][i], sq_dec[~dead].mean(0))
        assert torch.allclose(opt.state[d.W_enc]["exp_avg_sq"][:, i], sq_enc[:, ~dead].mean(1))
        assert torch.allclose(opt.state[d.b_enc]["exp_avg_sq"][i], sq_b[~dead].mean())
        assert opt.state[d.b_enc]["exp_avg_sq"][i] > 0
    for key in ("exp_avg", "exp_avg_sq"):  # alive rows keep their moments
        assert torch.equal(opt.state[d.W_dec][key][~dead], before[key][~dead])


def test_firing_tracker_counts_tokens_not_steps():
    t = FiringTracker(3, torch.device("cpu"))
    t.update(torch.tensor([True, False, False]), 100)
    t.update(torch.tensor([False, True, False]), 300)
    assert t.tokens_since_fired.tolist() == [300, 0, 400]
    assert t.dead(400).tolist() == [False, False, True]


def test_default_points_follow_the_warmup_and_stay_before_the_stop():
    for total in (1_000_000, 10_000_000, 300_000_000):
        cfg = TrainConfig(total_tokens=total, batch_size=4096)
        points, window = cfg.resample_points(), cfg.resample_window_tokens()
        warmup = cfg.sparsity_warmup_tokens()
        assert len(points) == 4 and warmup > 0
        assert points[0] == warmup + window  # dead is judged only on post-warm-up tokens
        assert all(b - a == window for a, b in itertools.pairwise(points))
        assert points[-1] < total / 2
    # The step that crosses the last point fires even if its batch also crosses the stop.
    assert crossed(points, points[-1] - 1, total)
    # relu_l1 is the 2023 recipe with resampling; the April 2024 recipe has none by default.
    recipe_2024 = TrainConfig(objective=ObjectiveConfig(name="relu_l1_2024"))
    assert recipe_2024.resample_points() == [] and TrainConfig().resample_enabled()
    every = TrainConfig(total_tokens=1000, resample=ResampleConfig(every_tokens=100))
    assert every.resample_points() == [100, 200, 300, 400]  # 500 is the stop: excluded
    assert every.resample_window_tokens() == 100


def test_sample_keeps_random_rows_of_the_batches_before_each_point():
    sample = ResampleSample([1000], sample_tokens=100, stretch_tokens=400, seed=0)
    for start in range(0, 1000, 100):
        x = torch.arange(start, start + 100).float()[:, None].expand(100, 4)
        sample.add(x, start)
        sample.release(start, start + 100)
        if start == 800:
            rows = sample.rows()
            assert rows is not None and rows.shape == (75, 4)  # 25 of each of 3 batches
            assert rows[:, 0].min() >= 600 and len(set(rows[:, 0].tolist())) == 75
    assert sample.rows() is None  # released once the point was passed


KILLED = list(range(0, 64, 4))  # 16 of 64 features


def _train_with_killed_features(tmp_path, resample: bool):
    base = small_cfg(tmp_path, steps=10)
    base = with_(base, resample=with_(base.resample, enabled=False))
    Trainer(base, d_in=16).fit(data())
    state = load_checkpoint(tmp_path)
    weights = state["members"]["dictionary"]["dictionary"]
    weights["W_enc"][:, KILLED] = 0.0
    weights["b_enc"][KILLED] = -1.0  # pre-activation is -1 on every input: never fires
    save_checkpoint(tmp_path, state)

    longer = with_(
        base,
        total_tokens=90 * 64,
        resample=with_(
            base.resample, enabled=resample, every_tokens=640, window_tokens=640, stop_fraction=0.7
        ),
    )
    return Trainer(longer, d_in=16, resume=True).fit(data())


@pytest.mark.parametrize("resample", [True, False])
def test_resampling_revives_deliberately_killed_features(tmp_path, resample):
    result = _train_with_killed_features(tmp_path, resample)
    held_out = [data().batch(10_000 + i) for i in range(8)]
    density = evaluate(result.dictionary, held_out).density
    revived = (density[KILLED] > 0).float().mean().item()
    events = [r for r in read_metrics(tmp_path) if "resample/resampled" in r]
    revivals = [r["resample/revived"] for r in read_metrics(tmp_path) if "resample/revived" in r]
    if resample:
        assert result.dictionary.cfg.provenance["resampled_features"] >= len(KILLED)
        assert revived == 1.0
        assert events[0]["resample/dead"] >= len(KILLED)
        assert revivals and revivals[0] >= len(KILLED)
    else:  # the control: without resampling nothing brings them back
        assert result.dictionary.cfg.provenance["resampled_features"] == 0
        assert revived == 0.0 and not events and not revivals


HOOK = "blocks.0.mlp.hook_post"


def _bundled_activations(model, split: str, tokens: int) -> torch.Tensor:
    from activations.stream import StreamedActivations
    from activations.text import TextConfig

    source = StreamedActivations(model, HOOK, TextConfig(split=split), batch_size=1024)
    rows, have = [], 0
    for x in source:
        rows.append(x)
        have += x.shape[0]
        if have >= tokens:
            break
    return torch.cat(rows)[:tokens]


@pytest.mark.slow
def test_resampling_keeps_bundled_model_features_alive_on_held_out_text(
    bundled, tmp_path, one_torch_thread
):
    """relu_l1 on the bundled model's MLP at a learning rate and L1 that kill features after
    the warm-up: without resampling a tenth of the dictionary never fires on held-out text,
    with it (10 points up to 90% of training, the learning rate decaying from halfway so the
    last revived features settle) under 1%."""
    train = _bundled_activations(bundled, "train", 100_000)
    held_out = _bundled_activations(bundled, "validation", 40_000)
    dead = {}
    for resample in (True, False):
        cfg = TrainConfig(
            total_tokens=100_000,
            batch_size=1024,
            out_dir=tmp_path / str(resample),
            checkpoint_every_steps=0,
            dictionary=DictionaryShape(d_sae=1024),
            objective=ObjectiveConfig(name="relu_l1", l1_coefficient=5.0),
            optim=OptimConfig(lr=5e-3, warmup_steps=10, decay_start_fraction=0.5),
            resample=ResampleConfig(enabled=resample, count=10, stop_fraction=0.9),
            logging=LoggingConfig(log_every_steps=10, progress=False, plots=False),
        )
        result = Trainer(cfg, d_in=512).fit(list(train.split(1024)))
        dead[resample] = evaluate(result.dictionary, held_out.split(4096)).dead_fraction
        if resample:
            rows = read_metrics(cfg.out_dir)
            resampled = sum(r.get("resample/resampled", 0) for r in rows)
            revived = sum(r.get("resample/revived", 0) for r in rows)
            assert resampled == result.dictionary.cfg.provenance["resampled_features"] > 50
            assert revived > 0.5 * resampled
    print(f"held-out never-fired fraction: {dead[True]:.2%} with, {dead[False]:.2%} without")
    assert dead[True] < 0.01
    assert dead[False] > 0.05


@pytest.mark.parametrize("fraction", [0.02, 0.1])
def test_fire_fraction_sets_the_bias_at_which_new_features_fire_that_often(fraction):
    d, opt = _random_relu(16, 32)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::4] = True
    pool = torch.randn(4096, 16) + 2.0  # a large mean, as in MLP activations
    ids = resample_dead_features(
        d, opt, dead, pool, torch.Generator().manual_seed(0), fire_fraction=fraction
    )
    assert ids.tolist() == list(range(0, 32, 4))
    assert (d.b_enc[ids] < 0).all()  # bias 0 would fire on about half the inputs
    with torch.no_grad():
        rate = (d(pool).feature_acts[:, ids] > 0).float().mean(0)
    assert torch.allclose(rate, torch.full_like(rate, fraction), atol=1.5 / 4096)
    # Without it, the paper's bias 0.
    d2 = build(DictionaryConfig("relu", d_in=16, d_sae=32))
    resample_dead_features(d2, torch.optim.Adam(d2.parameters()), dead, pool,
                           torch.Generator().manual_seed(0))  # fmt: skip
    assert (d2.b_enc[ids] == 0).all()
