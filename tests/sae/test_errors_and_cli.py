"""Bad dictionaries fail with one error naming the file and field; `sae info` / `sae export`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae import DictionaryFormatError
from sae.cli import main
from sae.io import load_dictionary
from tests.sae.util import random_dictionary


@pytest.fixture
def good(tmp_path: Path) -> Path:
    d = random_dictionary("topk", hook_name="blocks.0.mlp.hook_post", model_name="tiny-gpt2")
    d.save(tmp_path / "good")
    return tmp_path / "good"


def _edit_cfg(root: Path, **changes: object) -> None:
    cfg = json.loads((root / "cfg.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            del cfg[key]
        else:
            cfg[key] = value
    (root / "cfg.json").write_text(json.dumps(cfg))


def _edit_weights(root: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(root / "sae.safetensors")
    fn(tensors)
    save_file(tensors, str(root / "sae.safetensors"))


_DROP = object()


def _nan(t: dict[str, torch.Tensor]) -> None:
    t["W_dec"][2, 1] = float("nan")


CASES: dict[str, tuple[Callable[[Path], None], str, str | None, str]] = {
    # name: (break it, file, field, message fragment)
    "missing cfg": (
        lambda r: (r / "cfg.json").unlink(),
        "good",
        None,
        "not a dictionary directory",
    ),
    "missing weights": (
        lambda r: (r / "sae.safetensors").unlink(),
        "sae.safetensors",
        None,
        "missing file",
    ),
    "malformed json": (
        lambda r: (r / "cfg.json").write_text('{"d_in": 6,'),
        "cfg.json",
        None,
        "malformed JSON at line 1",
    ),
    "missing field": (
        lambda r: _edit_cfg(r, d_sae=_DROP),
        "cfg.json",
        "d_sae",
        "missing required field",
    ),
    "bad field type": (lambda r: _edit_cfg(r, d_in="six"), "cfg.json", "d_in", "positive integer"),
    "unknown architecture": (
        lambda r: _edit_cfg(r, architecture="gated2"),
        "cfg.json",
        "architecture",
        "unknown architecture 'gated2'",
    ),
    "k missing": (
        lambda r: _edit_cfg(r, k=None),
        "cfg.json",
        "k",
        "required for architecture topk",
    ),
    "unsupported dtype": (
        lambda r: _edit_cfg(r, dtype="int8"),
        "cfg.json",
        "dtype",
        "unsupported dtype 'int8'",
    ),
    "newer format": (
        lambda r: _edit_cfg(r, format_version=99),
        "cfg.json",
        "format_version",
        "newer version",
    ),
    "shape mismatch": (
        lambda r: _edit_cfg(r, d_in=7),
        "sae.safetensors",
        "W_enc",
        "shape [6, 10] but cfg.json (d_in=7, d_sae=10) implies [7, 10]",
    ),
    "dtype mismatch": (
        lambda r: _edit_cfg(r, dtype="float16"),
        "sae.safetensors",
        "W_enc",
        "dtype float32 but cfg.json says float16",
    ),
    "integer weights": (
        lambda r: _edit_weights(r, lambda t: t.update(b_dec=torch.zeros(6, dtype=torch.int32))),
        "sae.safetensors",
        "b_dec",
        "unsupported dtype torch.int32",
    ),
    "nan weights": (lambda r: _edit_weights(r, _nan), "sae.safetensors", "W_dec", "contains NaN"),
    "missing tensor": (
        lambda r: _edit_weights(r, lambda t: t.pop("b_enc")),
        "sae.safetensors",
        "b_enc",
        "missing tensor",
    ),
    "extra tensor": (
        lambda r: _edit_weights(r, lambda t: t.update(threshold=torch.zeros(10))),
        "sae.safetensors",
        "threshold",
        "unexpected tensor",
    ),
    "corrupt safetensors": (
        lambda r: (r / "sae.safetensors").write_bytes(b"\x10\x00garbage"),
        "sae.safetensors",
        None,
        "not a readable safetensors",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_dictionary_names_file_and_field(good: Path, case: str) -> None:
    breaker, file, field, fragment = CASES[case]
    breaker(good)
    with pytest.raises(DictionaryFormatError) as e:
        load_dictionary(good)
    assert Path(str(e.value.path)).name == file
    assert e.value.field == field
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_info_prints_the_facts(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(good)]) == 0
    out = capsys.readouterr().out
    for line in [
        "architecture           topk",
        "d_in                   6",
        "d_sae                  10",
        "hook                   blocks.0.mlp.hook_post",
        "model                  tiny-gpt2",
        "dtype                  float32",
        f"parameters             {6 * 10 * 2 + 10 + 6}",
    ]:
        assert line in out
    assert main(["info", str(good), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["parameters"] == 136 and facts["format"] == "native" and facts["k"] == 3


def test_info_on_broken_dir_is_one_line_and_nonzero(
    good: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit_weights(good, _nan)
    assert main(["info", str(good)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "sae.safetensors [W_dec]: contains NaN values" in err and err.startswith(
        "sae info: error:"
    )


@pytest.mark.slow
def test_info_subprocess_of_the_console_script(good: Path) -> None:
    exe = Path(sys.executable).parent / "sae"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    _edit_cfg(good, architecture="nope")
    bad = subprocess.run(
        [str(exe), "info", str(good)], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "cfg.json [architecture]: unknown architecture 'nope'" in bad.stderr


@pytest.mark.parametrize("fmt", ["saelens", "native"])
def test_export_command(
    good: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"out-{fmt}"
    assert main(["export", str(good), str(out), "--format", fmt]) == 0
    assert (out / ("sae_weights.safetensors" if fmt == "saelens" else "sae.safetensors")).is_file()
    a, b = load_dictionary(good), load_dictionary(out)
    for name, t in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], t)
    assert "wrote topk dictionary" in capsys.readouterr().out


def test_info_prints_the_held_out_figures_saved_with_the_dictionary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sae.evaluation import summary_line

    d = random_dictionary("relu")
    figures = {"eval_tokens": 100_000.0, "explained_variance": 0.794, "l0": 21.5,
               "dead_fraction": 0.0041, "loss_recovered": 0.912, "kl_div": 0.05}  # fmt: skip
    d.cfg.provenance = {"objective": "relu_l1", "eval": figures}
    d.save(tmp_path / "d")
    assert main(["info", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    line = summary_line(figures)
    assert f"evaluation             {line}" in out
    assert line == (
        "held-out 100,000 tokens: explained variance 79.4%, L0 21.5, never fired 0.4%, "
        "loss recovered 91.2%, KL 0.05"
    )
    assert "eval=" not in out  # printed once, as the line, not again inside provenance
    assert main(["info", str(tmp_path / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"]["eval"] == figures
