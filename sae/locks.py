"""Run folders are owned: one process at a time writes a run folder.

`sae train`, `sae cache` and `sae analyze` hold `hold_folder(out, "sae train")` while they
write `out`. It takes an exclusive `fcntl.flock` on `out/.sae.lock` (created, with `out`, if
missing). A second process, on this machine or another one sharing the folder over a
filesystem with working flock, is refused at once with one line naming the holder:

    runs/a is in use by `sae train` (pid 4242); wait for it to finish or pick another folder

The kernel drops a flock when its holder exits, however it exits (SIGKILL, OOM, a power cut
on a local disk), so a crash never leaves a stale lock to clear by hand; the PID written into
the file is only there so the refusal can name the holder. On release the lock file is
removed (while still held, so a process that opened it a moment earlier sees it gone and
starts over) and so are the folders `hold_folder` created, if nothing else was put in them:
a command refused after taking the lock leaves nothing behind.

Why not the `filelock` package (already installed): it does not record the holder, and its
lock files are left in place or removed unsafely; the flock calls themselves are a few lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from sae.errors import UserError

LOCK_NAME = ".sae.lock"
"""The lock file inside an owned folder (hidden; removed when released)."""


class FolderBusyError(UserError):
    """The folder is held by another process; the message names it."""


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders created here, outermost first."""
    missing = []
    probe = folder
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    folder.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


def _holder(fd: int) -> str:
    """What the lock file says about its holder ("`sae train` (pid 42)"); a holder that has
    only just locked it may not have written yet, so wait for that a moment."""
    for _ in range(20):
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if text:
            pid, _, command = text.partition(" ")
            return f"`{command}` (pid {pid})" if command else f"pid {pid}"
        time.sleep(0.025)
    return "another process"


def _acquire(path: Path, folder: Path, command: str) -> int:
    mode = 0o666 & ~_umask()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderBusyError(
                f"{folder} is in use by {holder}; wait for it to finish or pick another folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # Between our open and our flock the previous holder may have released it and unlinked
        # the file: then we hold a lock nobody else can see. Start over on the current file.
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
            return fd
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def hold_folder(folder: str | Path, command: str, name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold `folder` (created if missing) for `command` while the block runs; FolderBusyError
    (one line naming the holder's command and PID) if another process holds it. `name` picks
    another lock file, for processes of one job that share a folder (cache ranks)."""
    folder = Path(folder)
    created = _make_dirs(folder)
    path = folder / name
    try:
        fd = _acquire(path, folder, command)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        _remove_empty(created)


def _remove_empty(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return  # not empty: the command wrote something there
