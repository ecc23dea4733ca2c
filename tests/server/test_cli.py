"""`sae serve` as users run it: a separate process serving real dictionaries until stopped,
and one-line errors (exit 2, no traceback) for bad paths and settings."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sae.errors import UserError
from server.settings import settings_from_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_SERVE_")}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def test_sae_serve_runs_until_interrupted(dict_dirs: dict[str, Path]) -> None:
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "sae.cli",
        "serve",
        f"feats={dict_dirs['mlp0']}",
        str(dict_dirs["bare"]),
        "--port",
        str(port),
        "--max-page",
        "7",
    ]
    proc = subprocess.Popen(
        cmd,
        env=_env(SAE_SERVE_API_KEY="cli-key-123456"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "sae serve did not become ready"
            time.sleep(0.25)
        names = [d["name"] for d in httpx.get(f"{url}/api/dictionaries").json()["dictionaries"]]
        assert names == ["feats", "bare"]
        assert len(httpx.get(f"{url}/api/features/feats").json()["items"]) == 7  # --max-page
        r = httpx.post(
            f"{url}/api/features/bare/1/labels",
            json={"text": "x"},
            headers={"X-API-Key": "cli-key-123456"},
        )
        assert r.status_code == 201  # the key came from SAE_SERVE_API_KEY
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"http://127.0.0.1:{port}/" in out


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["/nonexistent/dictionary"], {}, "/nonexistent/dictionary"),
        (["x"], {"SAE_SERVE_MAX_BATCH": "lots"}, "SAE_SERVE_MAX_BATCH"),
    ],
)
def test_sae_serve_bad_input_is_one_line(
    args: list[str], env: dict[str, str], message: str
) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sae.cli", "serve", *args],
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert message in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr


def test_settings_validation() -> None:
    s = settings_from_env(
        {"SAE_SERVE_DICTIONARIES": "a,b=c/d", "SAE_SERVE_PUBLIC_READS": "yes"}, port=9
    )
    assert s.dictionaries == ["a", "b=c/d"] and s.public_reads is True and s.port == 9
    with pytest.raises(UserError, match="named"):
        settings_from_env({}, dictionaries=["x/a", "y/a"])
    with pytest.raises(UserError, match="nobody could read"):
        settings_from_env({}, public_reads=False)
    with pytest.raises(UserError, match="at least 8"):
        settings_from_env({}, api_key="short")
    with pytest.raises(UserError, match="max_queue must be a positive integer"):
        settings_from_env({}, max_queue=0)
    with pytest.raises(UserError, match="log_level"):
        settings_from_env({"SAE_SERVE_LOG_LEVEL": "loud"})
