"""Errors a user can act on. The CLI prints their message as one line and exits non-zero;
the HTTP service maps them to 4xx with the common error body."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a user: a path, a config, a request. The message says what and where."""


class DictionaryFormatError(UserError):
    """A dictionary directory that cannot be loaded: names the file and the field."""

    def __init__(self, path: object, field: str | None, problem: str) -> None:
        where = f"{path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.field = field
        self.problem = problem


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': sizes in messages, next to the exact byte count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


class DiskFullError(UserError):
    """A write that does not fit on its filesystem: names the file, the bytes it needs and the
    bytes free. Raised before writing when the size is known (`during_write` False), else when
    the disk fills mid-write; either way the file's previous version, if any, is unchanged."""

    def __init__(
        self,
        path: object,
        needed: int | None,
        free: int,
        *,
        written: int = 0,
        during_write: bool = False,
        kept: bool = False,
    ) -> None:
        if needed is not None:
            need = f"it needs {human_bytes(needed)} ({needed} bytes)"
        else:
            need = f"it needs more than the {human_bytes(written)} ({written} bytes) written"
        what = "the disk filled while writing" if during_write else "not enough free disk for"
        after = f"; the previous {path} is unchanged" if kept else "; nothing was written"
        super().__init__(f"{what} {path}: {need}, {human_bytes(free)} free{after}")
        self.path = path
        self.needed = needed
        self.free = free
