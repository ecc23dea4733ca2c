"""The activation cache: exact rows, one pass for several hooks, resume after SIGKILL, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from activations.cache import CacheConfig, cache_activations
from activations.cache_format import shard_name
from activations.hooks import ActivationCapture
from activations.text import TextConfig, context_batches
from sae.cli import main as sae_main
from sae.dataclass_cli import to_dict
from sae.errors import UserError
from tests.helpers import make_docs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOKS = ("blocks.0.mlp.hook_post", "blocks.0.hook_resid_post")


def load_hook(folder: Path) -> dict[str, torch.Tensor]:
    """All shards of one hook concatenated, plus its manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = [load_file(folder / s["file"]) for s in manifest["shards"]]
    return {
        k: torch.cat([s[k] for s in shards])
        for k in ("activations", "token_ids", "sequence", "position")
    }


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return make_docs(tmp_path_factory.mktemp("docs"), 40)


def test_cached_rows_equal_run_with_cache_bit_for_bit(tmp_path, docs, tiny_lm_dir, tiny_model):
    text = TextConfig(dataset=str(docs), context_size=32, batch_size=4)
    cfg = CacheConfig(
        out=tmp_path / "c",
        model=str(tiny_lm_dir),
        hooks=HOOKS,
        text=text,
        dtype="float32",
        shard_tokens=100,
        drop_bos=False,
        max_tokens=1000,
    )
    result = cache_activations(cfg, model=tiny_model)
    assert result.n_tokens == 1000
    batches = list(context_batches(text, tiny_model.tokenizer))
    tokens = torch.cat([b.tokens for b in batches])
    _, direct = tiny_model.run_with_cache(tokens, names_filter=list(HOOKS))
    for hook in HOOKS:
        rows = load_hook(result.hook_dirs[hook])
        assert rows["activations"].dtype == torch.float32 and len(rows["activations"]) == 1000
        want = direct[hook][rows["sequence"], rows["position"].long()]
        assert torch.equal(rows["activations"], want)  # bit for bit
        assert torch.equal(
            rows["token_ids"].long(), tokens[rows["sequence"], rows["position"].long()]
        )
        # rows are the stream in order: (sequence, position) strictly increasing
        key = rows["sequence"] * 32 + rows["position"]
        assert torch.equal(key, torch.arange(1000))
        manifest = json.loads((result.hook_dirs[hook] / "manifest.json").read_text())
        assert manifest["hook_name"] == hook and manifest["n_tokens"] == 1000
        assert manifest["d_in"] == rows["activations"].shape[1] and manifest["dtype"] == "float32"
        x = rows["activations"].double()
        assert torch.allclose(torch.tensor(manifest["mean"], dtype=torch.float64), x.mean(0))
        assert manifest["mean_squared_norm"] == pytest.approx(float(x.pow(2).sum(1).mean()))
        assert [s["n_rows"] for s in manifest["shards"]] == [100] * 10


def test_bf16_storage_and_bos_dropped(tmp_path, docs, tiny_lm_dir, tiny_model):
    text = TextConfig(dataset=str(docs), context_size=16, batch_size=8)
    cfg = CacheConfig(
        out=tmp_path / "c",
        model=str(tiny_lm_dir),
        hooks=HOOKS[:1],
        text=text,
        dtype="bfloat16",
        max_tokens=301,
        shard_tokens=64,
    )
    result = cache_activations(cfg, model=tiny_model)
    rows = load_hook(result.hook_dirs[HOOKS[0]])
    assert rows["activations"].dtype == torch.bfloat16 and len(rows["position"]) == 301
    assert int(rows["position"].min()) == 1  # no BOS rows
    tokens = torch.cat([b.tokens for b in context_batches(text, tiny_model.tokenizer)])
    with ActivationCapture(tiny_model, HOOKS[:1]) as capture:
        want = capture(tokens[: int(rows["sequence"].max()) + 1])[HOOKS[0]]
    assert torch.equal(
        rows["activations"], want[rows["sequence"], rows["position"].long()].bfloat16()
    )
    again = cache_activations(cfg, model=tiny_model)  # a finished cache is left as is
    assert again.new_tokens == 0 and again.n_tokens == 301


def test_two_ranks_write_one_cache_equal_to_a_single_run(tmp_path, docs, tiny_lm_dir, tiny_model):
    text = TextConfig(dataset=str(docs), context_size=16, batch_size=3)
    common = dict(
        model=str(tiny_lm_dir),
        hooks=HOOKS[:1],
        text=text,
        dtype="float32",
        max_tokens=500,
        shard_tokens=50,
    )
    single = cache_activations(CacheConfig(out=tmp_path / "one", **common), model=tiny_model)
    multi_cfg = CacheConfig(out=tmp_path / "two", **common)
    r0 = cache_activations(multi_cfg, model=tiny_model, rank=0, world_size=2)
    assert not (r0.hook_dirs[HOOKS[0]] / "manifest.json").exists()  # rank 1 not done yet
    r1 = cache_activations(multi_cfg, model=tiny_model, rank=1, world_size=2)
    assert r0.n_tokens + r1.n_tokens == 500
    a = load_hook(single.hook_dirs[HOOKS[0]])
    b = load_hook(r1.hook_dirs[HOOKS[0]])
    order = torch.argsort(b["sequence"] * 16 + b["position"])
    for k in a:
        assert torch.equal(a[k], b[k][order])
    m1 = json.loads((single.hook_dirs[HOOKS[0]] / "manifest.json").read_text())
    m2 = json.loads((r1.hook_dirs[HOOKS[0]] / "manifest.json").read_text())
    assert m2["n_tokens"] == 500 and m2["world_size"] == 2
    assert torch.allclose(torch.tensor(m1["mean"]), torch.tensor(m2["mean"]), atol=1e-6)


@pytest.mark.slow
def test_sigkilled_run_resumes_to_exactly_the_uninterrupted_cache(
    tmp_path, tiny_lm_dir, tiny_model
):
    docs = make_docs(tmp_path / "docs", 400, seed=3, words=120)
    text = TextConfig(dataset=str(docs), context_size=64, batch_size=8)
    common = dict(
        model=str(tiny_lm_dir),
        hooks=HOOKS,
        text=text,
        dtype="bfloat16",
        shard_tokens=256,
        max_tokens=30_000,
    )
    killed = CacheConfig(out=tmp_path / "killed", **common)
    config_file = tmp_path / "cache.json"
    config_file.write_text(json.dumps(to_dict(killed)))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[2]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "sae.cli", "cache", "--config", str(config_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = tmp_path / "killed" / HOOKS[1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (folder / shard_name(0, 3)).exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (folder / shard_name(0, 3)).exists(), "the child never got going"
    assert not (folder / "manifest.json").exists(), "the child finished before it was killed"

    resumed = cache_activations(killed, model=tiny_model)
    assert 0 < resumed.new_tokens < resumed.n_tokens == 30_000
    whole = cache_activations(CacheConfig(out=tmp_path / "whole", **common), model=tiny_model)
    for hook in HOOKS:
        a, b = resumed.hook_dirs[hook], whole.hook_dirs[hook]
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        assert not [n for n in names if n.endswith(".tmp")]
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit code and the error line (stderr also carries the model loader's progress bars)."""
    code = sae_main(["cache", *args])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("sae cache:")]
    assert len(lines) == 1, lines
    return code, lines[0]


def test_cli_errors_are_one_line(tmp_path, docs, tiny_lm_dir, capsys, monkeypatch):
    base = ["--model", str(tiny_lm_dir), "--out", str(tmp_path / "c"), "--text.context-size", "16"]
    code, err = _cli(
        [*base, "--text.dataset", str(docs), "--hooks", "blocks.0.mlp.hook_pots"], capsys
    )
    assert code == 2 and "\n" not in err
    assert "unknown hook 'blocks.0.mlp.hook_pots'" in err and "blocks.0.mlp.hook_post" in err
    assert not (tmp_path / "c").exists()  # failed before any work

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"content": "def f(): pass"}) + "\n")
    code, err = _cli([*base, "--text.dataset", str(jsonl)], capsys)
    assert code == 2 and "\n" not in err and "no text column 'text'" in err and "content" in err

    broken = tmp_path / "b.parquet"
    broken.write_bytes(b"\x00garbage" * 20)
    code, err = _cli([*base, "--text.dataset", str(broken)], capsys)
    assert code == 2 and "\n" not in err and "cannot read" in err

    real = shutil.disk_usage

    def tiny_disk(path):
        return real(path)._replace(free=1000)

    monkeypatch.setattr(shutil, "disk_usage", tiny_disk)
    code, err = _cli([*base, "--text.dataset", str(docs), "--max-tokens", "5000"], capsys)
    assert code == 2 and "\n" not in err
    assert "not enough free disk" in err and "1000 B free" in err
    assert not list((tmp_path / "c").rglob("*.safetensors"))


def test_a_different_run_in_the_same_folder_is_refused(tmp_path, docs, tiny_lm_dir, tiny_model):
    text = TextConfig(dataset=str(docs), context_size=16)
    cfg = CacheConfig(
        out=tmp_path / "c", model=str(tiny_lm_dir), text=text, max_tokens=100, shard_tokens=64
    )
    cache_activations(cfg, model=tiny_model)
    other = CacheConfig(**{**vars(cfg), "dtype": "float16"})
    with pytest.raises(UserError, match=r"different run.*dtype"):
        cache_activations(other, model=tiny_model)
    replaced = cache_activations(
        CacheConfig(**{**vars(other), "overwrite": True}), model=tiny_model
    )
    assert load_hook(replaced.hook_dirs[cfg.hooks[0]])["activations"].dtype == torch.float16
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("mine")
    with pytest.raises(UserError, match="not an activation cache"):
        cache_activations(CacheConfig(**{**vars(cfg), "out": tmp_path / "junk"}), model=tiny_model)


def test_whole_split_without_max_tokens_and_rank_from_the_torchrun_env(
    tmp_path, docs, tiny_lm_dir, tiny_model, monkeypatch
):
    from activations.text import iter_contexts

    text = TextConfig(dataset=str(docs), context_size=16)
    n_contexts = sum(1 for _ in iter_contexts(text, tiny_model.tokenizer))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = CacheConfig(out=tmp_path / "c", model=str(tiny_lm_dir), text=text, shard_tokens=64)
    result = cache_activations(cfg, model=tiny_model)
    assert result.n_tokens == (n_contexts // 2) * 15  # rank 1 of 2: odd contexts, BOS dropped
    rows = load_hook_part(result.hook_dirs[cfg.hooks[0]], rank=1)
    assert set(rows["sequence"].tolist()) == set(range(1, n_contexts, 2))
    assert not (result.hook_dirs[cfg.hooks[0]] / "manifest.json").exists()  # rank 0 missing
    from activations.reader import CachedActivations

    with pytest.raises(UserError, match=r"incomplete \(rank\(s\) \[0\]"):
        CachedActivations(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "n_contexts.json").read_text()) == {
        "n_contexts": n_contexts
    }
    monkeypatch.setenv("RANK", "0")
    rank0 = cache_activations(cfg, model=tiny_model)
    assert rank0.n_tokens + result.n_tokens == n_contexts * 15
    assert CachedActivations(tmp_path / "c").n_rows == n_contexts * 15  # one merged cache


def load_hook_part(folder: Path, rank: int) -> dict[str, torch.Tensor]:
    part = json.loads((folder / f"part-{rank:02d}.json").read_text())
    shards = [load_file(folder / s["file"]) for s in part["shards"]]
    return {k: torch.cat([s[k] for s in shards]) for k in ("activations", "sequence")}


def test_our_safetensors_writer_reads_back_with_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    from activations.cache_format import write_safetensors
    from activations.cache_writer import shard_statistics

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 7, generator=g) * 3 + 1
    tensors = {
        "activations": x.bfloat16(),
        "f16": x.half(),
        "f32": x,
        "token_ids": torch.arange(1000, dtype=torch.int32),
        "sequence": torch.arange(1000),
        "empty": torch.zeros(0, 7),
    }
    write_safetensors(tmp_path / "a.safetensors", tensors, {"format": "x"})
    back = load_file(tmp_path / "a.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "x"}
    sum_D, sq = shard_statistics(x, chunk=64)  # chunked float32 vs plain float64
    assert torch.allclose(sum_D, x.double().sum(0), rtol=1e-6)  # float32 partial sums
    assert float(sq) == pytest.approx(float(x.double().pow(2).sum()), rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_caching_on_the_gpu_matches_the_cpu(tmp_path, docs, tiny_lm_dir):
    text = TextConfig(dataset=str(docs), context_size=16)
    common = dict(model=str(tiny_lm_dir), hooks=HOOKS, text=text, dtype="float32", max_tokens=300)
    cpu = cache_activations(CacheConfig(out=tmp_path / "cpu", device="cpu", **common))
    gpu = cache_activations(CacheConfig(out=tmp_path / "gpu", device="cuda", **common))
    for hook in HOOKS:
        a, b = load_hook(cpu.hook_dirs[hook]), load_hook(gpu.hook_dirs[hook])
        assert torch.equal(a["sequence"], b["sequence"])
        assert torch.allclose(a["activations"], b["activations"], atol=1e-4)
