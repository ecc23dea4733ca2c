"""`sae serve` as users run it: a separate process serving real dictionaries until stopped,
and one-line errors (exit 2, no traceback) for bad paths and settings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sae.errors import UserError
from server.settings import settings_from_env
from tests.live_server import free_port, wait_until_ready


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_SERVE_")}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


@pytest.mark.slow
def test_sae_serve_runs_until_interrupted(dict_dirs: dict[str, Path]) -> None:
    port = free_port()
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
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}"
        # With no key configured, `sae serve` makes one and prints a browser URL carrying it.
        while "#key=" not in (line := proc.stdout.readline()):
            assert line, "".join(lines)  # EOF: the server exited
            lines.append(line)
        key = line.strip().rsplit("#key=", 1)[1]
        assert line.strip().startswith(f"open the browser with it: {url}/#key=")
        wait_until_ready(proc, url, timeout=90)
        names = [d["name"] for d in httpx.get(f"{url}/api/dictionaries").json()["dictionaries"]]
        assert names == ["feats", "bare"]
        assert len(httpx.get(f"{url}/api/features/feats").json()["items"]) == 7  # --max-page
        label = f"{url}/api/features/bare/1/labels"
        assert httpx.post(label, json={"text": "x"}).status_code == 401
        assert httpx.post(label, json={"text": "x"}, headers={"X-API-Key": key}).status_code == 201
        # Text runs in the model process, a child of the server, which goes away with it.
        body = {"text": "import os", "features": ["feats/1", "bare/2"]}
        r = httpx.post(f"{url}/api/activations", json=body, timeout=60)
        assert r.status_code == 200 and len(r.json()["features"]) == 2, r.text
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children  # the model process (and multiprocessing's resource tracker)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{c}").exists() for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{c}").exists() for c in children)
    assert f"serving 2 dictionaries at http://127.0.0.1:{port}/" in "".join(lines)


@pytest.mark.slow
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
