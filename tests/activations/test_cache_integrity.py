"""A damaged cache is found, named, and rewritten shard by shard; readers refuse it in one
line naming the shard and the repairing command; one writer per cache folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from activations.cache import CacheConfig, cache_activations
from activations.cache_format import file_sha256, shard_name
from activations.reader import CachedActivations
from activations.text import TextConfig
from sae.cli import main as sae_main
from sae.errors import DiskFullError, UserError
from sae.locks import hold_folder
from tests.helpers import make_docs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOOKS = ("blocks.0.mlp.hook_post", "blocks.0.hook_resid_post")


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return make_docs(tmp_path_factory.mktemp("docs"), 40)


def _cfg(out: Path, docs: Path, tiny_lm_dir: Path, **changes) -> CacheConfig:
    options = dict(
        out=out,
        model=str(tiny_lm_dir),
        hooks=HOOKS,
        text=TextConfig(dataset=str(docs), context_size=32, batch_size=4),
        dtype="bfloat16",
        max_tokens=1000,
        shard_tokens=100,  # 10 shards per hook; a context holds 31 rows, so shards cut contexts
    )
    return CacheConfig(**{**options, **changes})


@pytest.fixture(scope="module")
def sound(tmp_path_factory, docs, tiny_lm_dir, tiny_model) -> Path:
    """A finished cache nobody touches: the bytes a repaired cache must come back to."""
    out = tmp_path_factory.mktemp("sound") / "c"
    cache_activations(_cfg(out, docs, tiny_lm_dir), model=tiny_model)
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_line(argv: list[str], capsys) -> tuple[int, str, str]:
    code = sae_main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith(f"sae {argv[0]}:")]
    assert len(lines) <= 1, lines
    return code, lines[0] if lines else "", captured.out


def test_the_manifest_records_each_shards_size_and_checksum(sound):
    manifest = json.loads((sound / HOOKS[0] / "manifest.json").read_text())
    assert len(manifest["shards"]) == 10
    for entry in manifest["shards"]:
        path = sound / HOOKS[0] / entry["file"]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == file_sha256(path)


@pytest.mark.parametrize("damage", ["truncated", "four_bytes", "deleted"])
def test_a_damaged_shard_is_named_by_readers_and_rewritten_alone_by_sae_cache(
    tmp_path, sound, docs, tiny_lm_dir, tiny_model, capsys, damage
):
    out = tmp_path / "c"
    shutil.copytree(sound, out)
    folder = out / HOOKS[1]
    victim = folder / shard_name(0, 3)
    full = victim.stat().st_size
    if damage == "deleted":
        victim.unlink()
        problem = "missing"
    else:
        size = full // 2 if damage == "truncated" else 4
        os.truncate(victim, size)
        problem = f"{size} bytes, expected {full}"
    untouched = folder / shard_name(0, 4)
    stamp = untouched.stat().st_mtime_ns, untouched.stat().st_ino

    # Readers: one line naming the shard and the command that repairs it.
    with pytest.raises(UserError) as e:
        CachedActivations(out, HOOKS[1])
    assert f"shard {victim.name} is damaged ({problem});" in str(e.value)
    assert str(e.value).endswith(f"repair it with `sae cache --config {out}/cache_config.json`")
    CachedActivations(out, HOOKS[0])  # the other hook is sound
    code, line, _ = _one_line(["train", "--cache", str(out), "--hook", HOOKS[1],
                               "--out-dir", str(tmp_path / "run")], capsys)  # fmt: skip
    assert code == 2 and f"shard {victim.name} is damaged" in line and "sae cache --config" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written

    # The repairing command: names the shard, rewrites exactly it, as it was.
    result = cache_activations(_cfg(out, docs, tiny_lm_dir), model=tiny_model)
    assert result.repaired == (f"{HOOKS[1]}/{victim.name}: {problem}",)
    assert 0 < result.new_tokens <= 200
    for hook in HOOKS:
        assert _files(out / hook) == _files(sound / hook)
    assert (untouched.stat().st_mtime_ns, untouched.stat().st_ino) == stamp
    assert CachedActivations(out, HOOKS[1]).n_rows == 1000
    again = cache_activations(_cfg(out, docs, tiny_lm_dir), model=tiny_model)
    assert again.repaired == () and again.new_tokens == 0


def test_verify_finds_changed_bytes_through_the_caches_own_config(
    tmp_path, sound, tiny_lm_dir, capsys
):
    out = tmp_path / "c"
    shutil.copytree(sound, out)
    victim = out / HOOKS[0] / shard_name(0, 7)
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # same size: only the checksum can tell
    victim.write_bytes(bytes(data))
    config = str(out / "cache_config.json")
    code, line, printed = _one_line(["cache", "--config", config], capsys)
    assert code == 0 and "rewrote" not in printed  # sizes alone cannot see it

    code, line, printed = _one_line(["cache", "--config", config, "--verify"], capsys)
    assert code == 0, line
    assert f"rewrote 1 damaged shard(s):\n  {HOOKS[0]}/{victim.name}: checksum differs" in printed
    assert _files(out / HOOKS[0]) == _files(sound / HOOKS[0])
    code, line, printed = _one_line(["cache", "--config", config, "--verify"], capsys)
    assert code == 0 and "every shard matches its recorded size and checksum" in printed


def test_a_cache_without_checksums_is_still_read_and_verify_records_them(
    tmp_path, sound, docs, tiny_lm_dir, tiny_model
):
    out = tmp_path / "c"
    shutil.copytree(sound, out)
    for hook in HOOKS:
        for name in ("manifest.json", "part-00.json"):
            path = out / hook / name
            doc = json.loads(path.read_text())
            doc["shards"] = [{"file": s["file"], "n_rows": s["n_rows"]} for s in doc["shards"]]
            path.write_text(json.dumps(doc))
    assert CachedActivations(out, HOOKS[0]).n_rows == 1000  # sizes come from the headers
    os.truncate(out / HOOKS[0] / shard_name(0, 2), 1000)
    with pytest.raises(UserError, match=r"shard-00-000002.safetensors is damaged \(1000 bytes"):
        CachedActivations(out, HOOKS[0])
    result = cache_activations(_cfg(out, docs, tiny_lm_dir, verify=True), model=tiny_model)
    assert len(result.repaired) == 1
    for hook in HOOKS:
        assert _files(out / hook) == _files(sound / hook)  # checksums recorded again


def test_a_damaged_shard_of_an_interrupted_run_is_rewritten_on_resume(
    tmp_path, sound, docs, tiny_lm_dir, tiny_model
):
    out = tmp_path / "c"
    shutil.copytree(sound, out)
    for hook in HOOKS:  # as if killed after shard 5: no part or merged manifest yet
        for name in ("manifest.json", "part-00.json"):
            (out / hook / name).unlink()
        for i in range(6, 10):
            (out / hook / shard_name(0, i)).unlink()
    os.truncate(out / HOOKS[0] / shard_name(0, 1), 4)
    result = cache_activations(_cfg(out, docs, tiny_lm_dir), model=tiny_model)
    assert result.repaired == (f"{HOOKS[0]}/{shard_name(0, 1)}: unreadable header (4 bytes)",)
    for hook in HOOKS:
        assert _files(out / hook) == _files(sound / hook)


def test_a_second_sae_cache_into_a_held_folder_is_refused(tmp_path, docs, tiny_lm_dir, capsys):
    out = tmp_path / "c"
    argv = ["cache", "--out", str(out), "--model", str(tiny_lm_dir),
            "--text.dataset", str(docs), "--max-tokens", "100", "--text.context-size", "32"]  # fmt: skip
    with hold_folder(out, "sae cache"):
        code, line, _ = _one_line(argv, capsys)
    assert code == 2
    assert line == (
        f"sae cache: error: {out} is in use by `sae cache` (pid {os.getpid()}); "
        "wait for it to finish or pick another folder"
    )
    assert not out.exists()


def test_a_cache_refused_for_disk_leaves_nothing_and_a_full_disk_mid_shard_is_one_line(
    tmp_path, docs, tiny_lm_dir, tiny_model, monkeypatch
):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    cfg = _cfg(tmp_path / "c", docs, tiny_lm_dir)
    with pytest.raises(DiskFullError, match=r"not enough free disk for the cache in .*1000 B free"):
        cache_activations(cfg, model=tiny_model)
    assert list(tmp_path.iterdir()) == []  # no cache_config.json, no hook folders, no lock
    monkeypatch.undo()

    # Space for the run at the start, but the disk fills while shard 4 is written.
    import activations.cache_writer as cache_writer

    real_write = cache_writer.write_safetensors

    def filling(path, tensors, metadata):
        if ".shard-00-000004" in path.name:
            path.write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
        return real_write(path, tensors, metadata)

    monkeypatch.setattr(cache_writer, "write_safetensors", filling)
    with pytest.raises(DiskFullError) as e:
        cache_activations(cfg, model=tiny_model)
    target = tmp_path / "c" / HOOKS[0] / shard_name(0, 4)
    assert str(e.value).startswith(f"the disk filled while writing {target}: it needs ")
    assert not list((tmp_path / "c").rglob("*.tmp"))
    assert (tmp_path / "c" / HOOKS[0] / shard_name(0, 3)).is_file()  # earlier shards kept
    monkeypatch.undo()
    result = cache_activations(cfg, model=tiny_model)  # and the run resumes from there
    assert result.n_tokens == 1000 and result.new_tokens < 1000
