"""Atomic writes: whole or nothing, ordinary permissions (not mkstemp's 0600), and a full disk
reported as one line naming the file."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path

import pytest

from sae.atomic import atomic_dir, atomic_path, atomic_write_json, atomic_write_text
from sae.errors import DiskFullError


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_file_gets_umask_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "hello")
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "d") == 0o755
    assert _mode(tmp_path / "d" / "x") == 0o644


def test_private_files_inside_a_published_directory_get_umask_permissions(
    tmp_path: Path,
) -> None:
    """A writer that stages through mkstemp (save_pretrained) must not leave weights 0600."""
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as d:
            os.close(os.open(d / "weights", os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "model" / "weights") == 0o644


def test_failed_write_leaves_old_content_and_no_temp(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "m.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as d:
        (d / "half").write_text("x")
        raise RuntimeError("crash mid-write")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_dir_replaces_existing_whole(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "out") as d:
        (d / "old").write_text("1")
    with atomic_dir(tmp_path / "out") as d:
        (d / "new").write_text("2")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new"]


def _full_disk(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=free))


def test_a_write_that_cannot_fit_is_refused_before_anything_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _full_disk(monkeypatch, 1000)
    with pytest.raises(DiskFullError) as e, atomic_path(tmp_path / "new" / "x.bin", 5000):
        raise AssertionError("never reached")
    assert str(e.value) == (
        f"not enough free disk for {tmp_path / 'new' / 'x.bin'}: it needs 4.9 KiB (5000 bytes), "
        "1000 B free; nothing was written"
    )
    assert list(tmp_path.iterdir()) == []  # not even the folder
    with pytest.raises(DiskFullError, match="5000 bytes"), atomic_dir(tmp_path / "d", True, 5000):
        raise AssertionError("never reached")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        OSError("1000000 requested and 131056 written"),  # numpy's tofile
    ],
)
def test_a_disk_that_fills_mid_write_is_one_error_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    final = tmp_path / "checkpoint" / "state.pt"
    atomic_write_text(final, "the previous checkpoint")
    _full_disk(monkeypatch, 0)  # what a filled disk reports, whatever the error said
    with pytest.raises(DiskFullError) as e, atomic_path(final) as tmp:
        tmp.write_bytes(b"x" * 300)
        raise error
    message = str(e.value)
    assert message.startswith(f"the disk filled while writing {final}: it needs more than")
    assert "(300 bytes) written, 300 B free" in message
    assert message.endswith(f"the previous {final} is unchanged")
    assert final.read_text() == "the previous checkpoint"
    assert [p.name for p in final.parent.iterdir()] == ["state.pt"]  # no temporary left


def test_other_write_errors_pass_through(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="a bug"), atomic_path(tmp_path / "x"):
        raise RuntimeError("a bug")
    with pytest.raises(DiskFullError), atomic_path(tmp_path / "x"):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")


FILL_SCRIPT = r"""
import sys, numpy as np, torch
from pathlib import Path
from safetensors.torch import save_file
from sae.atomic import atomic_dir, atomic_path
from sae.errors import DiskFullError
root = Path(sys.argv[1])
big = torch.zeros(1 << 20)  # 4 MiB, on a 1 MiB filesystem
(root / "old.bin").write_bytes(b"previous")
def torch_path():
    with atomic_path(root / "old.bin") as tmp:
        torch.save(big, tmp)  # torch's own file writer: RuntimeError "unexpected pos"
def numpy_file():
    with atomic_path(root / "a.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, big.numpy())
def safetensors_dir():
    with atomic_dir(root / "dictionary") as tmp:
        save_file({"w": big}, str(tmp / "sae.safetensors"))
for write in (torch_path, numpy_file, safetensors_dir):
    try:
        write()
    except DiskFullError as e:
        print(e)
    else:
        print("no error")
print(sorted(p.name for p in root.iterdir()), (root / "old.bin").read_bytes())
"""


@pytest.mark.slow
def test_a_real_full_filesystem_is_one_error_for_torch_numpy_and_safetensors(
    tmp_path: Path,
) -> None:
    import sys

    from tests.helpers import run_on_tmpfs

    mount = tmp_path / "small"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = run_on_tmpfs(mount, "1m", [sys.executable, "-c", FILL_SCRIPT, str(mount)], env)
    if done is None:
        pytest.skip("cannot mount a tmpfs here (unshare -rm)")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4, done.stdout
    for line, name in zip(lines, ["old.bin", "a.npy", "dictionary"], strict=False):
        assert line.startswith(f"the disk filled while writing {mount / name}: it needs more than")
    assert lines[0].endswith("is unchanged") and lines[1].endswith("nothing was written")
    assert lines[3] == "['old.bin'] b'previous'"  # no temporary files, the old file intact


def test_the_sae_command_reports_any_other_full_disk_as_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sae import info_cli
    from sae.cli import main

    def fills(args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "plots/density.png")

    monkeypatch.setattr(info_cli, "run_info", fills)
    assert main(["info", "x"]) == 2
    assert capsys.readouterr().err == (
        "sae info: error: no space left on device writing plots/density.png\n"
    )
