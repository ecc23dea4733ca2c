"""`sae train` end to end on a real activation cache of the tiny GPT-2: config file plus
overrides, the run folder, the LM loss-recovered eval, --resume, one-line errors."""

from __future__ import annotations

import json

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
    code = main([*argv, "--objective.k", "4", "--eval-contexts", "2"])
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
    # The reader spans epochs when total_tokens exceeds the cache (1536 > 1024 rows).
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
    assert progress and progress[-1].startswith("train: 100% 1250/1250"), text
    assert max(len(ln) for ln in lines) < 300
