"""Stop cleanly on SIGINT/SIGTERM: finish the current step, write a checkpoint, return.

A cluster scheduler sends SIGTERM before killing a job, and Ctrl-C sends SIGINT; both set a
flag the loop checks between steps. The first signal restores the previous handlers, so a
second one interrupts immediately.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class StopOnSignal:
    """Context manager; `.signum` is the first signal received inside it (or None)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._restore()

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        # Signal handlers can only be installed from the main thread (e.g. not in a server
        # worker); elsewhere training runs without graceful stop.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in self.SIGNALS}
            for s in self.SIGNALS:
                signal.signal(s, self._handler)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()
