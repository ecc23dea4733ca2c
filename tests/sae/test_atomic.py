"""Atomic writes: whole or nothing, and ordinary permissions (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sae.atomic import atomic_dir, atomic_write_json, atomic_write_text


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
