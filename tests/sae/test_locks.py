"""Owned run folders: one holder at a time, named to the next; released however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae.locks import LOCK_NAME, FolderBusyError, hold_folder

ROOT = Path(__file__).parents[2]


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder` until killed."""
    code = (
        "import sys, time; from sae.locks import hold_folder\n"
        f"with hold_folder({str(folder)!r}, 'sae train'):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    proc = _holder(folder)
    try:
        with pytest.raises(FolderBusyError) as e, hold_folder(folder, "sae train"):
            pass
        message = str(e.value)
        assert "\n" not in message
        assert f"{folder} is in use by `sae train` (pid {proc.pid})" in message
    finally:
        proc.kill()
        proc.wait()
    # SIGKILL released it: the kernel drops a dead process's flock.
    with hold_folder(folder, "sae train"):
        assert (folder / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert not (folder / LOCK_NAME).exists()


def test_the_same_process_cannot_hold_a_folder_twice(tmp_path: Path) -> None:
    with hold_folder(tmp_path, "sae cache"):
        with (
            pytest.raises(FolderBusyError, match=rf"pid {os.getpid()}"),
            hold_folder(tmp_path, "sae cache"),
        ):
            pass
        with hold_folder(tmp_path, "sae cache", name=".sae.lock.rank01"):
            pass  # another rank of the same job has its own lock file


def test_a_refused_command_leaves_no_folder_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), hold_folder(tmp_path / "a" / "b", "sae train"):
        raise RuntimeError("refused after taking the lock")
    assert list(tmp_path.iterdir()) == []
    with hold_folder(tmp_path / "a" / "b", "sae train") as folder:
        (folder / "config.json").write_text("{}")
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["config.json"]


@pytest.mark.slow
def test_a_holder_stopped_by_sigterm_releases_too(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with hold_folder(tmp_path, "sae train"):
                break
        except FolderBusyError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
