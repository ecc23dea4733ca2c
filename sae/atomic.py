"""Nothing is lost: every file and directory the project writes appears whole or not at all.

Write under a temporary name in the same folder (same filesystem, so rename is atomic),
fsync, then rename over the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _default_mode(directory: bool) -> int:
    """Permissions an ordinary open()/mkdir() would give: mkstemp/mkdtemp use 0600/0700, which
    would leave an installed model or a shared cache unreadable by other users."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to `final`, on error removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode(directory=False))
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | Path, text: str) -> None:
    atomic_write_bytes(final, text.encode())


def atomic_write_json(final: str | Path, obj: Any) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `final` whole.

    An existing `final` is moved aside first and removed only after the new one is in place,
    so a crash leaves either the old or the new directory, never a half-written one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, _default_mode(directory=True))
        # Writers that stage files through mkstemp leave them 0600 (transformers 5.24's
        # save_pretrained does, for model.safetensors): publish them as the umask allows too.
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600:
                os.chmod(path, _default_mode(directory=False))
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
