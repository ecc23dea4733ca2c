"""Feature service latency and throughput under concurrent load.

Starts `sae serve` as its own process on 127.0.0.1, then this process (a separate one) fires a
bounded number of requests with a fixed concurrency over loopback and prints p50 / p99
latency and requests/s for: feature reads (store-backed pages with examples), batch reads,
text activations (model forward + encode, serialised in the model queue) and top features.

    python benchmarks/bench_server.py                          # bundled model if present
    python benchmarks/bench_server.py --requests 1000 --concurrency 16
    python benchmarks/bench_server.py --dict runs/my_dict      # a trained, analysed dictionary
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HOOK = "blocks.0.mlp.hook_post"
TEXT = (
    "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n\n"
    "for key, value in sorted(config.items()):\n    print(key, value)\n"
)


def build_dictionary(tmp: Path, d_sae: int, n_tokens: int) -> tuple[Path, str]:
    """A random relu dictionary on the bundled model (or a same-shape random GPT-2), analysed
    over the bundled corpus so feature pages have real statistics and examples."""
    import torch

    from activations.model import BUNDLED_DIR, load_model
    from activations.text import TextConfig
    from analysis.accumulator import AnalysisConfig
    from analysis.analyze import analyze
    from analysis.store import FeatureStore
    from sae.base import DictionaryConfig, build

    if (BUNDLED_DIR / "model.safetensors").is_file():
        model_name, desc = "bundled", "bundled stdlib-1l-512"
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for tests/
        from tests.conftest import make_tiny_lm_dir

        path = make_tiny_lm_dir(tmp / "lm", d_model=128, n_inner=512, n_ctx=128)
        model_name, desc = str(path), "random GPT-2 1L d_model 128 d_mlp 512 (bundled not built)"
    model = load_model(model_name)
    d_in = int(model.cfg.d_mlp)
    cfg = DictionaryConfig(
        architecture="relu", d_in=d_in, d_sae=d_sae, hook_name=HOOK, model_name=model_name
    )
    d = build(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        d.W_enc.normal_(0, d_in**-0.5)
        d.W_dec.copy_(d.W_enc.T)
        d.b_enc.fill_(-0.1)
    out = tmp / "dict"
    d.save(out)
    arrays = analyze(
        model,
        d,
        TextConfig(dataset="bundled", context_size=64, batch_size=32),
        AnalysisConfig(n_tokens=n_tokens, n_top=20),
        dictionary_name="dict",
        model_name=model_name,
        progress=False,
    )
    with FeatureStore.open(out) as store:
        store.replace_statistics(arrays)
    return out, f"{desc}; random relu d_sae {d_sae}, analysed on {n_tokens} tokens"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(dict_dir: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAE_SERVE_MAX_QUEUE": "1024"}
    cmd = [sys.executable, "-m", "sae.cli", "serve", f"dict={dict_dir}", "--port", str(port)]
    cmd += ["--log-level", "warning"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("server did not become ready in 120 s")


async def load(
    url: str, make_request: Any, n: int, concurrency: int
) -> tuple[list[float], float, int]:
    """Send n requests, `concurrency` at a time; latencies (s), wall time (s), failures."""
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal failures
            while not queue.empty():
                i = queue.get_nowait()
                method, path, body = make_request(i)
                t0 = time.perf_counter()
                r = await client.request(method, path, json=body)
                latencies.append(time.perf_counter() - t0)
                failures += r.status_code != 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return latencies, wall, failures


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dict", help="an analysed dictionary directory (default: built here)")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--analysis-tokens", type=int, default=16384)
    ap.add_argument("--requests", type=int, default=400, help="requests per scenario")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.dict:
            dict_dir, desc = Path(args.dict), args.dict
        else:
            dict_dir, desc = build_dictionary(Path(tmp), args.d_sae, args.analysis_tokens)
        port = free_port()
        proc = start_server(dict_dir, port)
        url = f"http://127.0.0.1:{port}"
        try:
            d_sae = httpx.get(f"{url}/api/dictionaries/dict").json()["d_sae"]
            n_tokens = len(
                httpx.post(
                    f"{url}/api/activations", json={"text": TEXT, "features": ["dict/0"]}
                ).json()["tokens"]
            )
            scenarios = {
                "feature page (GET, 10 examples)": lambda i: (
                    "GET",
                    f"/api/features/dict/{rng.randrange(d_sae)}",
                    None,
                ),
                "batch read (8 features, 2 ex.)": lambda i: (
                    "POST",
                    "/api/features/batch",
                    {
                        "features": [f"dict/{rng.randrange(d_sae)}" for _ in range(8)],
                        "examples_limit": 2,
                    },
                ),
                f"text activations ({n_tokens} tok, 4 feat.)": lambda i: (
                    "POST",
                    "/api/activations",
                    {
                        "text": TEXT + f"# {i}\n",
                        "features": [f"dict/{rng.randrange(d_sae)}" for _ in range(4)],
                    },
                ),
                f"top features ({n_tokens} tok)": lambda i: (
                    "POST",
                    "/api/top-features",
                    {"text": TEXT + f"# {i}\n", "dictionary": "dict", "k": 5, "limit": 20},
                ),
            }
            print(f"model + dictionary: {desc}")
            print(
                f"server: separate process on {url}; client: this process, concurrency {args.concurrency}, {args.requests} requests per scenario"
            )
            print(f"{'scenario':38s} {'p50 ms':>8s} {'p99 ms':>8s} {'req/s':>8s} {'failed':>7s}")
            for name, make in scenarios.items():
                asyncio.run(load(url, make, min(20, args.requests), args.concurrency))  # warm-up
                lat, wall, failed = asyncio.run(load(url, make, args.requests, args.concurrency))
                print(
                    f"{name:38s} {pct(lat, 0.5) * 1e3:8.1f} {pct(lat, 0.99) * 1e3:8.1f} {len(lat) / wall:8.1f} {failed:7d}"
                )
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
