"""`sae demo`: the main job end to end, reduced, on the bundled model and corpus.

`sae demo` runs as a user runs it (a separate process): cache -> train (relu + resampling and
topk in one sweep) -> analyze both -> compare -> report -> serve; then one HTTP request reads a
feature page from the live server. Marked slow; CI runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.live_server import free_port, wait_until_ready


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "sae.cli", "demo", "--out", str(out),
        "--tokens", "24000", "--train-tokens", "24000", "--d-sae", "1024",
        "--batch-size", "1024", "--analysis-tokens", "4000", "--eval-tokens", "2400",
        "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env = {k: v for k, v in env.items() if not k.startswith("SAE_SERVE_")}
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while "#key=" not in (line := proc.stdout.readline()):
            assert line, "demo exited before serving:\n" + "".join(lines[-60:])
            lines.append(line)
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(proc, url, timeout=120, interval=0.5, output=lambda: "".join(lines[-40:]))
        names = [d["name"] for d in httpx.get(f"{url}/api/dictionaries").json()["dictionaries"]]
        assert len(names) == 2
        page = httpx.get(f"{url}/api/features/{names[0]}", params={"limit": 5}).json()
        fid = page["items"][0]["feature_id"]
        feature = httpx.get(f"{url}/api/features/{names[0]}/{fid}", params={"limit": 3})
        assert feature.status_code == 200, feature.text
        body = feature.json()
        assert body["top_examples"], body  # analysis reached the served store
    finally:
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert "demo report" in text
    report = json.loads((out / "report.json").read_text())
    for member in ("relu_l1", "topk_auxk"):
        d = report["dictionaries"][member]
        assert d["eval"]["l0"] > 0 and d["eval"]["eval_tokens"] >= 2400
        assert {"explained_variance", "dead_fraction", "loss_recovered"} <= set(d["eval"])
        assert d["features"], member  # plain-text feature cards made it into the report
    assert report["dictionaries"]["topk_auxk"]["eval"]["l0"] == pytest.approx(32, abs=1e-6)
    # Every step left its artefact: a second run resumes with nothing to do.
    assert (out / "cache" / "blocks.0.mlp.hook_post" / "manifest.json").is_file()
