"""Progress bars that suit where the output goes: every long loop's bar is `progress_bar()`.

On a terminal it is an ordinary tqdm bar, redrawn in place (and a widget in a notebook).
Anywhere else (a CI log, `make demo > log`, a file under nohup) a redrawn bar becomes one
ever-growing line of carriage-return updates, so there it prints a plain line instead, at
most every `LOG_INTERVAL` seconds and once at the end:

    train:  42% 420/1000 [00:12<00:16, 35.1step/s, loss=0.12, l0=31.9]

tqdm itself does the counting, timing and rate limiting (`mininterval`); this module only
picks the bar and turns its redraws into whole lines. The Hugging Face libraries draw their
own bars (weights loading, downloads); `quiet_library_bars` turns those off in a log.
"""

from __future__ import annotations

import os
import re
import sys
from typing import IO, Any

LOG_INTERVAL = 10.0
"""Seconds between progress lines when the output is not a terminal."""

LINE_FORMAT = (
    "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)
"""One progress line (tqdm `bar_format`) when the output is not a terminal."""

COUNT_FORMAT = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"
"""The same, for a loop of unknown length."""


class _Lines:
    """A stream for tqdm that writes each redraw ("\\r" + status + padding) as its own line."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", text):
            line = part.rstrip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()  # type: ignore[attr-defined]
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def progress_bar(iterable: Any = None, *, file: IO[str] | None = None, **kwargs: Any) -> Any:
    """A tqdm bar (same arguments) on a terminal; plain lines every few seconds otherwise."""
    from tqdm import tqdm

    stream = file if file is not None else sys.stderr
    if kwargs.get("disable"):
        return tqdm(iterable, file=stream, **kwargs)
    if file is None and _in_notebook():
        from tqdm.auto import tqdm as auto_tqdm

        return auto_tqdm(iterable, **kwargs)
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return tqdm(iterable, file=stream, **kwargs)
    for key in ("dynamic_ncols", "ncols", "bar_format", "mininterval"):
        kwargs.pop(key, None)
    sized = kwargs.get("total") is not None or hasattr(iterable, "__len__")
    return tqdm(
        iterable,
        file=_Lines(stream),
        mininterval=LOG_INTERVAL,
        bar_format=LINE_FORMAT if sized else COUNT_FORMAT,
        ascii=True,
        **kwargs,
    )


def quiet_library_bars() -> None:
    """Turn off the Hugging Face libraries' own bars when stderr is not a terminal (unless the
    user set HF_HUB_DISABLE_PROGRESS_BARS). They read the variable when first imported, so the
    `sae` command calls this before importing them."""
    isatty = getattr(sys.stderr, "isatty", None)
    if not (callable(isatty) and isatty()):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
