"""`sae train --model --hooks`: dictionaries straight from a model, several hooks from one
forward pass, exact resume after a signal, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from sae.base import Dictionary
from sae.cli import main
from tests.helpers import make_docs
from training.checkpoint import load_checkpoint
from training.metrics import read_metrics
from training.stream_source import SharedStream

MLP, RESID = "blocks.0.mlp.hook_post", "blocks.0.hook_resid_post"


def test_two_hooks_of_the_bundled_model_from_one_pass_and_no_activation_files(tmp_path, capsys):
    out = tmp_path / "OUT"
    argv = [
        "train", "--model", "stdlib-1l-512", "--hooks", MLP, RESID,
        "--total-tokens", "40000", "--batch-size", "1024", "--dictionary.d-sae", "256",
        "--objective.name", "topk_auxk", "--objective.k", "8", "--out-dir", str(out),
        "--logging.plots", "false", "--logging.progress", "false",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    widths = {}
    for hook in (MLP, RESID):
        d = Dictionary.load(out / hook / "dictionary")
        widths[hook] = d.d_in
        assert (d.d_sae, d.cfg.hook_name, d.cfg.model_name) == (256, hook, "stdlib-1l-512")
        assert d.cfg.provenance["eval"]["eval_tokens"] > 0
        assert "loss_recovered" in d.cfg.provenance["eval"]
        assert read_metrics(out / hook)[-1]["tokens"] >= 40000
    assert widths == {MLP: 512, RESID: 128}
    written = [p for p in out.rglob("*") if p.is_file()]
    tensors = [p for p in written if p.suffix in (".safetensors", ".pt", ".npy", ".bin")]
    assert sorted(p.relative_to(out).as_posix() for p in tensors) == sorted(
        f"{h}/{f}"
        for h in (MLP, RESID)
        for f in ("checkpoint/state.pt", "dictionary/sae.safetensors")
    )  # checkpoints and dictionaries: no activation files
    assert sum(p.stat().st_size for p in written) < 8_000_000


def _assert_same_dictionaries(full: Path, resumed: Path) -> None:
    """Both hooks' saved dictionaries are identical, tensor for tensor."""
    for hook in (MLP, RESID):
        a, b = (Dictionary.load(r / hook / "dictionary") for r in (full, resumed))
        for name, value in a.state_dict().items():
            assert torch.equal(b.state_dict()[name], value), (hook, name)


def _argv(tiny_lm_dir: Path, docs: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--model", str(tiny_lm_dir), "--hooks", MLP, RESID,
        "--text.dataset", str(docs), "--text.context-size", "16", "--text.batch-size", "4",
        "--buffer-tokens", "120", "--total-tokens", "1920", "--batch-size", "64",
        "--dictionary.d-sae", "32", "--dictionary.init-tokens", "128",
        "--objective.name", "topk_auxk", "--objective.k", "4", "--optim.warmup-steps", "2",
        "--eval.tokens", "120", "--eval.loss-recovered", "false", "--out-dir", str(out),
        "--logging.plots", "false", "--logging.progress", "false", "--logging.log-every-steps", "1",
        "--checkpoint-every-steps", "0", *extra,
    ]  # fmt: skip


@pytest.mark.usefixtures("one_torch_thread")
def test_sigint_then_resume_equals_an_uninterrupted_run(tiny_lm_dir, tmp_path, monkeypatch):
    docs = make_docs(tmp_path / "docs", 60)
    assert main(_argv(tiny_lm_dir, docs, tmp_path / "full")) == 0

    pulls = {"n": 0}
    real_pull = SharedStream.pull

    def pull_then_signal(self: SharedStream) -> bool:
        pulls["n"] += 1
        if pulls["n"] == 13:  # mid-run and mid-window: Ctrl-C as a user would press it
            os.kill(os.getpid(), signal.SIGINT)
        return real_pull(self)

    monkeypatch.setattr(SharedStream, "pull", pull_then_signal)
    part = tmp_path / "part"
    assert main(_argv(tiny_lm_dir, docs, part)) == 130
    monkeypatch.setattr(SharedStream, "pull", real_pull)
    states = [load_checkpoint(part / h) for h in (MLP, RESID)]
    step = states[0]["step"]
    assert states[1]["step"] == step and 12 <= step < 30  # both hooks stop after one step
    positions = [s["data_state"]["position"] for s in states]
    assert positions[0] == positions[1] == step * 64  # rows of the text handed to training
    assert main([*_argv(tiny_lm_dir, docs, part), "--resume"]) == 0

    _assert_same_dictionaries(tmp_path / "full", part)
    for hook in (MLP, RESID):
        losses = [[r["loss"] for r in read_metrics(r / hook) if "loss" in r] for r in (tmp_path / "full", part)]  # fmt: skip
        assert losses[0] == losses[1] and len(losses[0]) == 30
    assert json.loads((part / "stream.json").read_text())["hooks"] == [MLP, RESID]


@pytest.mark.usefixtures("one_torch_thread")
def test_bad_input_is_one_line(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    docs = make_docs(tmp_path / "docs", 20)
    out = tmp_path / "o"

    def error(*argv: str) -> str:
        assert main(list(argv)) == 2
        # transformers draws its weight-loading bar first; ours is the one error line.
        lines = [
            x
            for x in capsys.readouterr().err.splitlines()
            if x.strip() and "Loading weights" not in x
        ]
        assert len(lines) == 1 and lines[0].startswith("sae train: error:"), lines
        return lines[0]

    base = _argv(tiny_lm_dir, docs, out)
    hooks_at = base.index("--hooks")
    unknown = [*base[: hooks_at + 1], "blocks.0.hook_nope", *base[hooks_at + 3 :]]
    err = error(*unknown)
    assert "valid hook names" in err and "blocks.0.hook_resid_post" in err
    past = [*base[: hooks_at + 1], "blocks.4.hook_resid_post", *base[hooks_at + 3 :]]
    assert "past the model's last layer" in error(*past)
    assert "more than the text holds" in error(*base, "--total-tokens", "10000000")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    offline = error(*base, "--text.dataset", "no-such-user/no-such-dataset")
    assert "no-such-user/no-such-dataset" in offline
    assert "--model" in error("train", "--hooks", MLP, "--out-dir", str(out))
    assert not (out / "stream.json").exists()


@pytest.mark.usefixtures("one_torch_thread")
def test_each_hook_logs_its_own_wandb_run(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    docs = make_docs(tmp_path / "docs", 40)
    out = tmp_path / "w"
    argv = _argv(tiny_lm_dir, docs, out, "--total-tokens", "640", "--logging.wandb", "true")
    assert main(argv) == 0
    for hook in (MLP, RESID):  # a second run must not end the first (which then logs nothing)
        runs = list((out / hook / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and (out / hook / "wandb_id.txt").read_text() in runs[0].name
        assert any(r.get("eval/fvu") is not None for r in read_metrics(out / hook))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_sweep_trains_every_member_on_every_hook_from_one_pass(tiny_lm_dir, tmp_path, capsys):
    docs = make_docs(tmp_path / "docs", 40)
    out = tmp_path / "s"
    argv = _argv(tiny_lm_dir, docs, out, "--total-tokens", "640", "--sweep", "objective.k=2,6")
    assert main(argv) == 0
    for hook in (MLP, RESID):
        l0 = {}
        for member in ("k=2", "k=6"):
            d = Dictionary.load(out / hook / member)
            assert d.cfg.hook_name == hook
            l0[member] = d.cfg.provenance["eval"]["l0"]
        assert l0["k=2"] < l0["k=6"]
    assert capsys.readouterr().out.count("held-out") == 4


@pytest.mark.usefixtures("one_torch_thread")
def test_resume_when_one_hook_checkpointed_further_than_the_other(
    tiny_lm_dir, tmp_path, monkeypatch
):
    """A crash between two hooks' checkpoint writes leaves them at different steps: the
    stream restarts at the earlier one and that hook trains alone until it catches up."""
    import shutil

    docs = make_docs(tmp_path / "docs", 60)
    assert main(_argv(tiny_lm_dir, docs, tmp_path / "full")) == 0
    real_pull = SharedStream.pull

    def interrupt_at(n: int) -> None:
        count = {"n": 0}

        def pull(self: SharedStream) -> bool:
            count["n"] += 1
            if count["n"] == n:
                os.kill(os.getpid(), signal.SIGINT)
            return real_pull(self)

        monkeypatch.setattr(SharedStream, "pull", pull)

    part = tmp_path / "part"
    interrupt_at(8)
    assert main(_argv(tiny_lm_dir, docs, part)) == 130
    early = tmp_path / "early"
    shutil.copytree(part / RESID / "checkpoint", early)
    interrupt_at(10)
    assert main([*_argv(tiny_lm_dir, docs, part), "--resume"]) == 130
    shutil.rmtree(part / RESID / "checkpoint")
    shutil.copytree(early, part / RESID / "checkpoint")  # RESID's newer checkpoint was lost
    steps = [load_checkpoint(part / h)["step"] for h in (MLP, RESID)]
    assert steps[0] > steps[1]
    monkeypatch.setattr(SharedStream, "pull", real_pull)
    assert main([*_argv(tiny_lm_dir, docs, part), "--resume"]) == 0
    _assert_same_dictionaries(tmp_path / "full", part)
