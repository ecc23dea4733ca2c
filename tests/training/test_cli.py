"""`sae train` end to end on a real activation cache of the tiny GPT-2: config file plus
overrides, the run folder, the LM loss-recovered eval, --resume, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sae.base import Dictionary
from sae.cli import main
from tests.helpers import make_docs
from training.metrics import read_metrics

HOOK = "blocks.0.mlp.hook_post"


@pytest.fixture(scope="module")
def cache(tiny_lm_dir, tmp_path_factory):
    from activations.cache import CacheConfig, cache_activations
    from activations.text import TextConfig

    root = tmp_path_factory.mktemp("train_cli")
    docs = make_docs(root / "docs", 12)
    cfg = CacheConfig(
        out=root / "cache",
        model=str(tiny_lm_dir),
        hooks=(HOOK,),
        text=TextConfig(dataset=str(docs), context_size=32, batch_size=8, shuffle_buffer=0),
        dtype="float32",
        max_tokens=1024,
        device="cpu",
    )
    cache_activations(cfg)
    return root / "cache"


def test_sae_train_from_a_cache_with_config_file_overrides_and_resume(cache, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "total_tokens": 1536,
                "batch_size": 128,
                "checkpoint_every_steps": 5,
                "dictionary": {"expansion_factor": 2.0, "init_tokens": 256},
                "objective": {"name": "topk_auxk", "k": 8},
                "logging": {"log_every_steps": 2, "progress": False, "plots": False},
            }
        )
    )
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--cache", str(cache), "--out-dir", str(out)]
    argv += ["--eval.tokens", "200"]
    code = main([*argv, "--objective.k", "4"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "dictionary:" in printed and "trained 1536 tokens in 12 steps" in printed

    saved = Dictionary.load(out / "dictionary")
    assert saved.cfg.architecture == "topk" and saved.cfg.k == 4  # the flag beat the file
    assert (saved.d_in, saved.d_sae) == (64, 128)  # d_mlp 64, expansion factor 2
    assert saved.cfg.hook_name == HOOK
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["objective"]["k"] == 4 and resolved["batch_size"] == 128
    rows = read_metrics(out)
    final = [r for r in rows if "eval/loss_recovered" in r]
    assert final and {"eval/kl_div", "eval/clean_loss", "eval/spliced_loss"} <= set(final[-1])
    # The held-out figures are the same in metrics.jsonl, cfg.json and the printed summary.
    figures = saved.cfg.provenance["eval"]
    assert figures == {k[5:]: v for k, v in final[-1].items() if k.startswith("eval/")}
    # 200 rows asked, cut back to a context boundary (32 tokens, BOS dropped: 31 rows each).
    assert 200 <= figures["eval_tokens"] < 200 + 31
    assert f"held-out {int(figures['eval_tokens']):,} tokens" in printed
    assert f"loss recovered {100 * figures['loss_recovered']:.1f}%" in printed
    # The reader spans epochs when total_tokens exceeds the training rows.
    assert max(r["tokens"] for r in rows) == 1536

    # --resume on a finished run continues from its last checkpoint: nothing left to do.
    assert main([*argv, "--resume", "--objective.k", "4"]) == 0
    assert "trained 1536 tokens in 12 steps" in capsys.readouterr().out


def test_sae_train_errors_are_one_line(cache, tmp_path, capsys):
    assert main(["train", "--out-dir", str(tmp_path)]) == 2
    assert "--cache is required" in capsys.readouterr().err
    assert main(["train", "--cache", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = [
        "train",
        "--cache",
        str(cache),
        "--dictionary.d-sae",
        "8",
        "--dictionary.expansion-factor",
        "2",
    ]
    assert main(bad) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["train", "--cache", str(cache), "--sweep", "batch_size=1,2"]) == 2
    assert "cannot be swept" in capsys.readouterr().err
    assert main(["train", "--cache", str(cache), "--out-dir", str(tmp_path / "r"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def _cache_of(tiny_lm_dir, out, docs, max_tokens=1024):
    from activations.cache import CacheConfig, cache_activations
    from activations.text import TextConfig

    text = TextConfig(dataset=str(docs), context_size=32, batch_size=8, shuffle_buffer=0)
    cfg = CacheConfig(out=out, model=str(tiny_lm_dir), hooks=(HOOK,), text=text,
                      dtype="float32", max_tokens=max_tokens, device="cpu")  # fmt: skip
    return cache_activations(cfg).path


def test_an_evaluation_cache_of_other_text_is_evaluated_on_and_the_whole_cache_trained_on(
    cache, tiny_lm_dir, tmp_path, capsys, caplog
):
    held = _cache_of(tiny_lm_dir, tmp_path / "val", make_docs(tmp_path / "docs", 6, seed=7), 400)
    out = tmp_path / "run"
    argv = ["train", "--cache", str(cache), "--out-dir", str(out), "--eval.cache", str(held),
            "--total-tokens", "512", "--batch-size", "128", "--objective.name", "topk_auxk",
            "--objective.k", "4", "--dictionary.d-sae", "128", "--logging.plots", "false",
            "--logging.progress", "false"]  # fmt: skip
    with caplog.at_level("INFO", logger="training.cache_source"):
        assert main(argv) == 0, capsys.readouterr().err
    assert "training on 1024 cached rows" in caplog.text  # nothing of it held out
    capsys.readouterr()
    saved = Dictionary.load(out / "dictionary").cfg.provenance
    # Every whole context of the 400-row evaluation cache (31 rows each; the 13th is cut short).
    assert saved["eval"]["eval_tokens"] == 12 * 31
    assert saved["eval_source"].startswith(f"the first 372 rows of the evaluation cache {held}")
    assert main(["info", str(out / "dictionary")]) == 0
    assert f"{'evaluated on':<22} {saved['eval_source']}" in capsys.readouterr().out

    # Refused in one line: the training cache itself, the same text, more rows than it holds.
    same = _cache_of(tiny_lm_dir, tmp_path / "same", Path(cache).parent / "docs", 400)
    for bad, message in ((cache, "is the training cache itself"),
                         (same, "caches the same text as the training cache")):  # fmt: skip
        assert main([*argv[:6], str(bad), *argv[7:], "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    assert main([*argv, "--eval.tokens", "390", "--overwrite"]) == 2
    assert "holds 372 rows of whole contexts, fewer than the 390 asked" in capsys.readouterr().err


@pytest.mark.slow
def test_progress_in_a_log_file_is_short_whole_lines(cache, tmp_path):
    """`sae train > log 2>&1`: progress is plain lines, not carriage-return redraws."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    log = tmp_path / "train.log"
    argv = [
        *("--cache", str(cache), "--out-dir", str(tmp_path / "run")),
        *("--total-tokens", "40000", "--batch-size", "32", "--device", "cpu"),
        *("--dictionary.expansion-factor", "2", "--dictionary.init-tokens", "64"),
        *("--logging.log-every-steps", "10", "--logging.plots", "false"),
        *("--checkpoint-every-steps", "0"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    with open(log, "w") as fh:
        done = subprocess.run(
            [sys.executable, "-m", "sae.cli", "train", *argv],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=600,
        )
    text = log.read_bytes().decode()  # not read_text(): it would turn "\r" into "\n"
    assert done.returncode == 0, text
    assert "\r" not in text
    lines = text.split("\n")
    progress = [ln for ln in lines if ln.startswith("train: ")]
    assert progress and progress[-1].startswith("train: 100% 40.0k/40.0k"), text
    assert "tok/s" in progress[-1], text  # the rate a user compares with the data source
    assert max(len(ln) for ln in lines) < 300


# -- the run folder: owned, refused when it holds a run, resumed only with the same options ----

SMALL = [
    *("--total-tokens", "512", "--batch-size", "128", "--device", "cpu"),
    *("--dictionary.d-sae", "128", "--dictionary.init-tokens", "256"),
    *("--logging.progress", "false", "--logging.plots", "false", "--logging.log-every-steps", "1"),
    *("--checkpoint-every-steps", "2"),
]


def _train(cache, out, capsys, *extra: str) -> tuple[int, list[str]]:
    """Exit code and the `sae train:` error lines."""
    code = main(["train", "--cache", str(cache), "--out-dir", str(out), *SMALL, *extra])
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.startswith("sae train:")]


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(cache, out, capsys) == (0, [])
    before = (out / "dictionary" / "sae.safetensors").read_bytes()

    code, lines = _train(cache, out, capsys, "--objective.l1-coefficient", "1")
    assert code == 2 and len(lines) == 1
    assert f"{out} holds a finished run (dictionaries dictionary)" in lines[0]
    assert "--overwrite" in lines[0]
    assert (out / "dictionary" / "sae.safetensors").read_bytes() == before  # untouched

    code, lines = _train(cache, out, capsys, "--resume", "--dictionary.d-sae", "32")
    assert code == 2 and lines == [
        f"sae train: error: cannot resume {out}: dictionary.d_sae differs (saved 128, now 32); "
        "resume with the saved value, or start over with --overwrite"
    ]
    code, lines = _train(cache, out, capsys, "--resume", "--objective.name", "topk_auxk")
    assert code == 2 and "objective.name differs" in lines[0] and '(saved "relu_l1"' in lines[0]
    code, lines = _train(cache, out, capsys, "--resume", "--overwrite")
    assert code == 2 and "not both" in lines[0]

    # Where, how and how long it runs may change on resume.
    assert _train(cache, out, capsys, "--resume", "--total-tokens", "768")[0] == 0
    assert max(r["tokens"] for r in read_metrics(out)) == 768

    assert _train(cache, out, capsys, "--overwrite", "--dictionary.d-sae", "64") == (0, [])
    assert Dictionary.load(out / "dictionary").d_sae == 64
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("}\n") and "\n\n" not in text
    assert max(r["tokens"] for r in read_metrics(out)) == 512  # the old run's rows are gone
    assert not (out / ".sae.lock").exists()


def test_an_unfinished_run_is_refused_but_one_with_no_checkpoint_starts_over(
    cache, tmp_path, capsys
):
    out = tmp_path / "run"
    assert _train(cache, out, capsys)[0] == 0
    import shutil

    shutil.rmtree(out / "dictionary")  # as if killed after a checkpoint
    code, lines = _train(cache, out, capsys)
    assert code == 2 and "holds an unfinished run with a checkpoint" in lines[0]
    assert "--resume" in lines[0]
    shutil.rmtree(out / "checkpoint")  # killed before its first checkpoint: nothing to keep
    assert _train(cache, out, capsys) == (0, [])


def test_a_second_train_into_a_held_folder_is_one_line_naming_the_holder(cache, tmp_path, capsys):
    import os

    from sae.locks import hold_folder

    out = tmp_path / "run"
    with hold_folder(out, "sae train"):
        code, lines = _train(cache, out, capsys)
    assert code == 2 and lines == [
        f"sae train: error: {out} is in use by `sae train` (pid {os.getpid()}); "
        "wait for it to finish or pick another folder"
    ]
    assert not out.exists()  # the refusal left nothing behind


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous_one(
    cache, tmp_path, capsys, monkeypatch
):
    import errno

    import torch

    from training.checkpoint import load_checkpoint

    out = tmp_path / "run"
    real_save = torch.save
    calls = []

    def filling_save(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) == 2:  # the second checkpoint fills the disk half-way
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_save)
    code, lines = _train(cache, out, capsys)
    assert code == 2 and len(lines) == 1, lines
    path = out / "checkpoint" / "state.pt"
    assert lines[0].startswith(f"sae train: error: the disk filled while writing {path}: it needs ")
    assert "bytes)" in lines[0] and lines[0].endswith(f"the previous {path} is unchanged")
    assert load_checkpoint(out)["step"] == 2  # the first checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]

    import shutil

    real_usage = shutil.disk_usage
    monkeypatch.setattr(torch, "save", real_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=10_000))
    code, lines = _train(cache, out, capsys, "--resume")
    assert code == 2 and len(lines) == 1, lines
    assert f"not enough free disk for {path}: it needs" in lines[0]
    assert "10000 B free" not in lines[0] and "9.8 KiB free" in lines[0]
    assert load_checkpoint(out)["step"] == 2


TRAIN_ON_A_SMALL_DISK = r"""
import os, sys
from pathlib import Path
from sae.cli import main
from training.checkpoint import load_checkpoint
cache, out, *flags = sys.argv[1:]
code = main(["train", "--cache", cache, "--out-dir", out, *flags])
print(code, load_checkpoint(Path(out))["step"], sorted(os.listdir(Path(out) / "checkpoint")))
"""


@pytest.mark.slow
def test_a_real_full_disk_during_training_is_one_line(cache, tmp_path):
    """The run folder on a 400 KiB filesystem: the first checkpoint (about 250 KiB) fits, the
    second cannot sit beside it; one line, and the first checkpoint is still there."""
    import os
    import sys
    from pathlib import Path

    from tests.helpers import run_on_tmpfs

    mount = tmp_path / "disk"
    out = mount / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    argv = [sys.executable, "-c", TRAIN_ON_A_SMALL_DISK, str(cache), str(out), *SMALL]
    done = run_on_tmpfs(mount, "400k", argv, env)
    if done is None:
        pytest.skip("cannot mount a tmpfs here (unshare -rm)")
    assert done.returncode == 0, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("sae train:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    path = out / "checkpoint" / "state.pt"
    assert errors[0].startswith(f"sae train: error: not enough free disk for {path}: it needs")
    assert errors[0].endswith(f"the previous {path} is unchanged")
    assert done.stdout.split("\n")[-2] == "2 2 ['state.pt']"


@pytest.mark.slow
def test_two_concurrent_sae_train_processes_one_is_refused(cache, tmp_path, capsys):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "run"
    long_run = [a if a != "512" else "100000000" for a in SMALL]  # total tokens: runs until killed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    argv = ["train", "--cache", str(cache), "--out-dir", str(out), *long_run]
    first = subprocess.Popen(
        [sys.executable, "-m", "sae.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file():  # training, with the folder held
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        code, lines = _train(cache, out, capsys)
        assert code == 2 and lines == [
            f"sae train: error: {out} is in use by `sae train` (pid {first.pid}); "
            "wait for it to finish or pick another folder"
        ]
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def test_a_sweep_draws_the_held_out_frontier_of_its_members(cache, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = [*SMALL[:-4], "--checkpoint-every-steps", "0", "--logging.plots", "true"]
    argv += ["--objective.name", "topk_auxk", "--sweep", "objective.k=2,8", "--eval.tokens", "150"]
    assert main(["train", "--cache", str(cache), "--out-dir", str(out), *argv]) == 0
    printed = capsys.readouterr().out
    l0 = {}
    for k in (2, 8):
        figures = Dictionary.load(out / f"k={k}").cfg.provenance["eval"]
        l0[k] = figures["l0"]
        assert f"loss recovered {100 * figures['loss_recovered']:.1f}%" in printed
    assert l0 == {2: pytest.approx(2.0), 8: pytest.approx(8.0)}
    png = out / "plots" / "frontier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
