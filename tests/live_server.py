"""For tests that start `sae serve` (or `sae demo`, which ends by serving) as a separate
process, as users run it: a free loopback port and the wait until the server is ready."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(
    proc: subprocess.Popen[str],
    url: str,
    timeout: float,
    interval: float = 0.25,
    output: Callable[[], str] = str,
) -> None:
    """Poll `url/readyz` until it answers 200. Fails (with `output()`, e.g. the process's
    last lines) if the process exits first, or if `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, output()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "sae serve did not become ready"
        time.sleep(interval)
