"""Nothing is lost: every file and directory the project writes appears whole or not at all.

Write under a temporary name in the same folder (same filesystem, so rename is atomic),
fsync, then rename over the final name.

A full disk is one line, not a library's traceback: a write given its size (`expected_bytes`)
is refused before it starts when the space is not free (`check_free_disk`), and a write that
fills the disk anyway (torch, numpy and safetensors each report it differently) becomes a
`DiskFullError` naming the file; the temporary file is removed, the previous version stays.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sae.errors import DiskFullError

FULL_BELOW = 1 << 20
"""A failed write with less than this free on its filesystem is reported as a full disk."""


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


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes free to this user on the filesystem that holds (or would hold) `path`."""
    return shutil.disk_usage(_existing(Path(path))).free


def check_free_disk(path: str | Path, needed: int, what: str | Path | None = None) -> None:
    """DiskFullError if the filesystem of `path` has fewer than `needed` free bytes; `what`
    names the thing to be written in the message (default: `path`)."""
    free = free_bytes(path)
    if free < needed:
        name = what if what is not None else _existing(Path(path))
        raise DiskFullError(name, needed, free, kept=isinstance(name, Path) and name.exists())


def _disk_full(e: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for want of space. Errors are searched for ENOSPC/EDQUOT
    first; torch ("unexpected pos") and numpy ("requested and written") lose the errno, so a
    filesystem left nearly full by the write counts too."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return free_bytes(folder) < FULL_BELOW
    except OSError:
        return False


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _full_error(e: Exception, final: Path, tmp: Path, expected_bytes: int | None) -> DiskFullError:
    written = _size(tmp) if tmp.exists() else 0
    return DiskFullError(
        final,
        expected_bytes,
        free_bytes(final.parent) + written,  # what is free once the partial file is gone
        written=written,
        during_write=True,
        kept=final.exists(),
    )


@contextlib.contextmanager
def atomic_path(final: str | Path, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary file path; on success it is renamed to `final`, on error removed.

    With `expected_bytes` the free space is checked first (DiskFullError, nothing created).
    """
    final = Path(final)
    if expected_bytes is not None:
        check_free_disk(final.parent, expected_bytes, what=final)
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
    except Exception as e:
        full = not isinstance(e, DiskFullError) and _disk_full(e, final.parent)
        error = _full_error(e, final, tmp, expected_bytes) if full else None
        tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final, expected_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | Path, text: str) -> None:
    atomic_write_bytes(final, text.encode())


def atomic_write_json(final: str | Path, obj: Any) -> None:
    atomic_write_text(final, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(
    final: str | Path, overwrite: bool = True, expected_bytes: int | None = None
) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `final` whole.

    An existing `final` is moved aside first and removed only after the new one is in place,
    so a crash leaves either the old or the new directory, never a half-written one. With
    `expected_bytes` the free space is checked first (DiskFullError, nothing created).
    """
    final = Path(final)
    if expected_bytes is not None:
        check_free_disk(final.parent, expected_bytes, what=final)
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
    except Exception as e:
        full = not isinstance(e, DiskFullError) and _disk_full(e, final.parent)
        error = _full_error(e, final, tmp, expected_bytes) if full else None
        shutil.rmtree(tmp, ignore_errors=True)
        if error is not None:
            raise error from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
