"""`sae train-lm`: the bundled model's recorded figures, validation windows, and a tiny
training run that resumes exactly."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from activations.corpus import iter_documents
from activations.model import (
    BUNDLED_DIR,
    load_model,
)
from lm import config as lm_config
from lm import data as lm_data
from lm import evaluation as lm_evaluation
from lm import train as train_lm
from lm.config import TrainLMConfig
from lm.train import run_training
from sae.errors import UserError


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((BUNDLED_DIR / "training_metrics.json").read_text())


def test_recorded_loss_is_far_below_the_unigram_entropy(metrics: dict) -> None:
    ce, unigram = metrics["val_ce_nats_per_token"], metrics["unigram_entropy_nats_per_token"]
    assert 0 < ce < 0.5 * unigram  # the bundled model's target: less than half
    disjoint = metrics["val_ce_disjoint_windows_nats_per_token"]
    assert ce < disjoint < 0.55 * unigram  # restarting the context every window costs
    card = (BUNDLED_DIR / "README.md").read_text()
    for figure in (ce, disjoint, unigram):
        assert f"{figure:.4f} nats/token" in card
    assert f"stride {metrics['eval_stride']}" in card
    assert metrics["command"].startswith("sae train-lm") and metrics["command"] in card
    assert metrics["tokens_seen"] == (
        metrics["steps"] * metrics["config"]["batch_size"] * metrics["config"]["n_ctx"]
    )


@pytest.mark.slow
def test_recorded_numbers_are_those_of_the_shipped_files(metrics: dict) -> None:
    """Recompute from the shipped tokenizer and weights: unigram entropy exactly, and the
    cross-entropy of the first sliding windows close to the full-split figure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if metrics["corpus"]["python"] != sys.version.split()[0]:
        pytest.skip("the stdlib of this interpreter differs from the one the model saw")
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    stream = lm_data.tokenize_stream(tokenizer, list(iter_documents("validation")))
    n_ctx, stride = metrics["config"]["n_ctx"], metrics["eval_stride"]
    windows = lm_data.validation_windows(stream, tokenizer.bos_token_id, n_ctx, stride)
    targets = windows.targets()
    assert len(targets) == metrics["val_tokens"] == len(stream)
    unigram = lm_evaluation.unigram_entropy(targets, len(tokenizer))
    assert unigram == pytest.approx(metrics["unigram_entropy_nats_per_token"], abs=1e-4)

    model = AutoModelForCausalLM.from_pretrained(BUNDLED_DIR)
    first = lm_data.ValidationWindows(windows.contexts[:48], windows.first_scored[:48])
    subset_ce = lm_evaluation.validation_loss(model, first, batch_size=24)
    assert subset_ce == pytest.approx(metrics["val_ce_nats_per_token"], abs=0.4)
    # Greedy decoding is deterministic: the card's samples come from these weights.
    for prompt in ("def ", "import "):
        assert lm_evaluation.greedy_sample(model, tokenizer, prompt) == metrics["samples"][prompt]


def test_greedy_generation_looks_like_python(metrics: dict) -> None:
    samples = metrics["samples"]
    assert re.match(r"def [A-Za-z_]\w*\(", samples["def "]), samples["def "]
    assert re.match(r"import [A-Za-z_][\w.]*", samples["import "]), samples["import "]
    # "class " is not one of the required prompts; this model continues it as `class = ...`.
    assert re.match(r"    for [A-Za-z_]\w* in ", samples["    for "]), samples["    for "]


def test_greedy_sample_with_token_healing_extends_the_prompt(tiny_lm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    for prompt in ("def ", "import os\n", "x = [i * 2 for", ""):
        text = lm_evaluation.greedy_sample(model, tokenizer, prompt, n=5)
        assert text.startswith(prompt), (prompt, text)
        assert len(tokenizer.encode(text, add_special_tokens=False)) > len(
            tokenizer.encode(prompt, add_special_tokens=False)
        )


# --- validation windows -----------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(length=st.integers(7, 60), n_ctx=st.integers(2, 8), data=st.data())
def test_validation_windows_score_every_token_once(length: int, n_ctx: int, data) -> None:
    stride = data.draw(st.integers(1, n_ctx - 1))
    stream = np.arange(100, 100 + length, dtype=np.uint16)
    windows = lm_data.validation_windows(stream, 0, n_ctx, stride)
    assert windows.contexts.shape[1] == n_ctx and (windows.contexts[:, 0] == 0).all()
    assert windows.targets().tolist() == stream.tolist()  # each once, in order, no tail lost
    # Past the first window every scored target has at least n_ctx - 1 - stride tokens before it.
    assert (windows.first_scored[1:] >= n_ctx - 1 - stride).all()


def test_eval_stride_defaults_to_half_the_window() -> None:
    assert TrainLMConfig(n_ctx=256).stride == 127
    assert TrainLMConfig(n_ctx=2).stride == 1  # the one target of a 2-token window
    assert TrainLMConfig(n_ctx=256, eval_stride=255).stride == 255
    with pytest.raises(ValueError, match="eval_stride"):
        TrainLMConfig(n_ctx=256, eval_stride=256)


def test_validation_windows_need_one_window_of_tokens() -> None:
    with pytest.raises(UserError, match="fewer than 7 tokens"):
        lm_data.validation_windows(np.arange(6), 0, 8, 3)
    with pytest.raises(ValueError, match="stride"):
        lm_data.validation_windows(np.arange(20), 0, 8, 8)


def test_sliding_loss_is_the_mean_of_each_token_given_its_window(tiny_lm_dir: Path) -> None:
    """Stride 1: the loss of target t is that of the model run on BOS + the n_ctx - 2 tokens
    before it, computed here one prediction at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    stream = np.random.default_rng(0).integers(1, model.config.vocab_size, 40)
    n_ctx, bos = 6, 0
    windows = lm_data.validation_windows(stream, bos, n_ctx, stride=1)
    expected = []
    with torch.no_grad():
        for t in range(len(stream)):
            before = stream[max(0, t - (n_ctx - 2)) : t] if t >= n_ctx - 1 else stream[:t]
            x = torch.tensor([[bos, *before.tolist()]])
            logp = model(input_ids=x).logits[0, -1].log_softmax(-1)
            expected.append(-float(logp[int(stream[t])]))
    got = lm_evaluation.validation_loss(model, windows, batch_size=7)
    assert got == pytest.approx(sum(expected) / len(expected), abs=1e-5)


# --- sae train-lm: a tiny smoke run, resumed after an interruption ---------------------------


def _tiny(tmp_path: Path, name: str, **overrides) -> TrainLMConfig:
    fields = dict(
        out=tmp_path / name / "out",
        work_dir=tmp_path / name / "work",
        max_docs=3,
        vocab_size=300,
        d_model=16,
        d_mlp=32,
        n_heads=2,
        n_ctx=32,
        batch_size=4,
        steps=6,
        warmup_steps=2,
        checkpoint_every=2,
        eval_batch_size=16,
        sample_tokens=2,
        threads=1,  # tiny ops: OpenMP hand-offs would cost more than they save on a busy box
        compile=False,  # compiling costs more than these few steps; its own test is below
    )
    fields.update(overrides)
    return TrainLMConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.slow
def test_train_lm_smoke_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    straight = run_training(_tiny(tmp_path, "straight"))
    assert torch.get_num_threads() == threads
    assert straight["tokens_seen"] == 6 * 4 * 32
    assert straight["val_tokens"] > 0 and straight["unigram_entropy_nats_per_token"] > 0

    # Interrupt at step 3 (Ctrl-C): a checkpoint is written there and the rerun continues it.
    real_lr_at = train_lm.lr_at

    def interrupt_at_3(step: int, cfg: TrainLMConfig) -> float:
        if step == 3:
            raise KeyboardInterrupt
        return real_lr_at(step, cfg)

    resumed_cfg = _tiny(tmp_path, "resumed")
    monkeypatch.setattr(train_lm, "lr_at", interrupt_at_3)
    with pytest.raises(KeyboardInterrupt):
        run_training(resumed_cfg)
    assert not resumed_cfg.out.exists()
    monkeypatch.setattr(train_lm, "lr_at", real_lr_at)
    resumed = run_training(resumed_cfg)

    a = load_file(tmp_path / "straight" / "out" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert resumed["val_ce_nats_per_token"] == straight["val_ce_nats_per_token"]

    tokenizer_config = json.loads((resumed_cfg.out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    bridge = load_model(str(resumed_cfg.out))
    _, cache = bridge.run_with_cache("import os\n")
    assert cache["blocks.0.mlp.hook_post"].shape[-1] == 32

    with pytest.raises(UserError, match="different configuration"):
        run_training(_tiny(tmp_path, "resumed", steps=8))


@pytest.mark.slow
def test_train_lm_compiled_bf16_steps_match_eager_float32(tmp_path: Path) -> None:
    """The fast training path (torch.compile + bf16 autocast, the default where bf16 is native)
    optimises the same model as plain float32: after a few steps the weights differ only by
    bf16 rounding."""
    same = dict(steps=3, checkpoint_every=3, dropout=0.0, lr=3e-3)  # compiled dropout differs
    fast = run_training(_tiny(tmp_path, "fast", compile=True, autocast="bfloat16", **same))
    plain = run_training(_tiny(tmp_path, "plain", autocast="float32", **same))
    a = load_file(tmp_path / "fast" / "out" / "model.safetensors")
    b = load_file(tmp_path / "plain" / "out" / "model.safetensors")
    init = 0.02  # GPT-2's init std: three Adam steps of lr <= 3e-3 move weights ~1e-2
    # The key bias's gradient is zero in exact arithmetic (softmax ignores a constant shift),
    # so each path steps it by its own rounding noise, which Adam scales up to ~lr: skip it.
    d = a["transformer.wte.weight"].shape[1]
    for t in (a, b):
        t["transformer.h.0.attn.c_attn.bias"][d : 2 * d] = 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=init / 4)
    assert fast["val_ce_nats_per_token"] == pytest.approx(plain["val_ce_nats_per_token"], abs=0.02)
    config = json.loads((tmp_path / "fast" / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert not torch.equal(a["lm_head.weight"], a["transformer.wte.weight"])


def test_train_lm_auto_autocast_is_bf16_only_where_native(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`autocast="auto"` becomes bfloat16 only on hardware that computes it natively (emulated
    bf16 on an AVX2 CPU is slower than float32), and the run records the dtype it used."""
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(lm_config, "native_bf16", lambda device, native=native: native)
        assert lm_config.resolve_autocast(TrainLMConfig()).autocast == expected
        assert lm_config.resolve_autocast(TrainLMConfig(autocast="float32")).autocast == "float32"
    monkeypatch.undo()
    assert lm_config.native_bf16("cpu") == (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )
    metrics = run_training(_tiny(tmp_path, "auto", steps=2))
    assert metrics["config"]["autocast"] == (
        "bfloat16" if lm_config.native_bf16("cpu") else "float32"
    )


def test_train_lm_without_a_compiler_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(train_lm.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match=r"C\+\+ compiler.*--compile false"):
        run_training(_tiny(tmp_path, "nocc", compile=True))


def test_train_lm_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="refusing to replace"):
        run_training(_tiny(tmp_path, "x", out=tmp_path / "precious"))
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"


def test_train_lm_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="divisible"):
        TrainLMConfig(d_model=130, n_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        TrainLMConfig(vocab_size=100)
    with pytest.raises(ValueError, match="autocast must be one of"):
        TrainLMConfig(autocast="int8")
