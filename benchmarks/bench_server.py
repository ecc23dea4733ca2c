"""The feature service under mixed load: feature reads while the model works.

Starts `sae serve` as its own process on 127.0.0.1, then this process (a separate one) runs
32 closed-loop clients for 20 s over loopback: most read feature pages (SQLite + memory-
mapped arrays), the others post text activations, top features and steering. It prints, per
endpoint, requests/s, p50/p99 latency and the shed rate (503 busy), and the server's RSS
(its process and children) before, at the peak of, and 10 s after the load. It runs three
times: with the model in its own process (the default), on a thread of the server process
(`worker_process=false`), and with the feature-page clients alone (the machine's floor).

    python benchmarks/bench_server.py                      # bundled model
    python benchmarks/bench_server.py --seconds 60 --clients 64
    python benchmarks/bench_server.py --dict runs/my_dict  # a trained, analysed dictionary
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
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

HOOK = "blocks.0.mlp.hook_post"
KEY = "bench-key-0123456789"
TEXT = (
    "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n\n"
    "for key, value in sorted(config.items()):\n    print(key, value)\n"
)
ROLES = {"feature page": 20, "activations": 6, "top features": 3, "steer": 3}
"""Clients per endpoint, out of 32; scaled to --clients."""


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


def start_server(dict_dir: Path, port: int, worker_process: bool) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAE_SERVE_API_KEY": KEY}
    env["SAE_SERVE_WORKER_PROCESS"] = str(worker_process).lower()
    cmd = [sys.executable, "-m", "sae.cli", "serve", f"dict={dict_dir}", "--port", str(port)]
    cmd += ["--log-level", "warning"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
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
    raise SystemExit("server did not become ready in 300 s")


def rss_mib(pid: int) -> float:
    """Resident memory of `pid` and its children (the model process), in MiB."""
    pids, total = [pid], 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry.name))
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def requests_for(d_sae: int, rng: random.Random) -> dict[str, Any]:
    def feature_page(i: int) -> tuple[str, str, Any]:
        return "GET", f"/api/features/dict/{rng.randrange(d_sae)}", None

    def activations(i: int) -> tuple[str, str, Any]:
        feats = [f"dict/{rng.randrange(d_sae)}" for _ in range(4)]
        return "POST", "/api/activations", {"text": TEXT + f"# {i}\n", "features": feats}

    def top_features(i: int) -> tuple[str, str, Any]:
        body = {"text": TEXT + f"# {i}\n", "dictionary": "dict", "k": 5, "limit": 20}
        return "POST", "/api/top-features", body

    def steer(i: int) -> tuple[str, str, Any]:
        iv = [{"feature": f"dict/{rng.randrange(d_sae)}", "strength": 2.0}]
        body = {"prompt": TEXT[:60], "interventions": iv, "max_new_tokens": 8}
        return "POST", "/api/steer", body

    return {
        "feature page": feature_page,
        "activations": activations,
        "top features": top_features,
        "steer": steer,
    }


async def mixed_load(
    url: str, make: dict[str, Any], clients: int, seconds: float, pid: int, reads_only: bool
) -> tuple[dict[str, list[tuple[float, int]]], float]:
    """Closed-loop clients by ROLES for `seconds`: (status, latency) per endpoint, peak RSS."""
    results: dict[str, list[tuple[float, int]]] = defaultdict(list)
    scale = clients / sum(ROLES.values())
    roles = [r for r, n in ROLES.items() for _ in range(max(1, round(n * scale)))]
    if reads_only:
        roles = [r for r in roles if r == "feature page"]
    limits = httpx.Limits(max_connections=len(roles), max_keepalive_connections=len(roles))
    headers = {"Authorization": f"Bearer {KEY}"}
    peak = 0.0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(
        base_url=url, timeout=120, limits=limits, headers=headers
    ) as client:

        async def run(role: str) -> None:
            i = 0
            while time.monotonic() < stop:
                method, path, body = make[role](i)
                t0 = time.perf_counter()
                r = await client.request(method, path, json=body)
                results[role].append((time.perf_counter() - t0, r.status_code))
                i += 1
                if r.status_code == 503:  # shed: back off as Retry-After asks
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))

        async def watch() -> None:
            nonlocal peak
            while time.monotonic() < stop:
                peak = max(peak, rss_mib(pid))
                await asyncio.sleep(0.5)

        await asyncio.gather(watch(), *(run(r) for r in roles))
    return results, peak


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def run_one(
    dict_dir: Path, worker_process: bool, args: argparse.Namespace, reads_only: bool = False
) -> dict[str, Any]:
    port = free_port()
    proc = start_server(dict_dir, port, worker_process)
    url = f"http://127.0.0.1:{port}"
    try:
        d_sae = httpx.get(f"{url}/api/dictionaries/dict").json()["d_sae"]
        make = requests_for(d_sae, random.Random(0))
        asyncio.run(mixed_load(url, make, args.clients, 3.0, proc.pid, reads_only))  # warm-up
        time.sleep(2)
        before = rss_mib(proc.pid)
        results, peak = asyncio.run(
            mixed_load(url, make, args.clients, args.seconds, proc.pid, reads_only)
        )
        time.sleep(10)
        after = rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    return {"results": results, "rss": (before, peak, after)}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dict", help="an analysed dictionary directory (default: built here)")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--analysis-tokens", type=int, default=16384)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.dict:
            dict_dir, desc = Path(args.dict), args.dict
        else:
            dict_dir, desc = build_dictionary(Path(tmp), args.d_sae, args.analysis_tokens)
        runs = {
            "model process": run_one(dict_dir, True, args),
            "model thread": run_one(dict_dir, False, args),
            "no model load": run_one(dict_dir, True, args, reads_only=True),
        }
    print(f"model + dictionary: {desc}")
    print(
        f"{args.clients} closed-loop clients for {args.seconds:.0f} s ({os.cpu_count()} CPUs); "
        f"clients per endpoint {ROLES} (of 32); server: sae serve in its own process"
    )
    head = f"{'endpoint':14s} {'model in':14s} {'req/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'shed':>6s} {'errors':>6s}"
    print(head)
    for role in ROLES:
        for name, run in runs.items():
            rows = run["results"][role]
            if not rows:
                continue
            ok = [t for t, s in rows if s == 200]
            shed = sum(s == 503 for _, s in rows)
            errors = sum(s not in (200, 503) for _, s in rows)
            print(
                f"{role:14s} {name:14s} {len(rows) / args.seconds:7.1f} {pct(ok, 0.5) * 1e3:8.1f} "
                f"{pct(ok, 0.99) * 1e3:8.1f} {shed / max(1, len(rows)):6.1%} {errors:6d}"
            )
    p99 = {
        name: pct([t for t, s in run["results"]["feature page"] if s == 200], 0.99)
        for name, run in runs.items()
    }
    print(
        f"feature page p99: {p99['model thread'] * 1e3:.1f} ms with the model on a thread, "
        f"{p99['model process'] * 1e3:.1f} ms in its own process "
        f"({p99['model thread'] / p99['model process']:.1f}x)"
    )
    print(
        f"feature page p99 with no model requests at all: {p99['no model load'] * 1e3:.1f} ms "
        "(the machine's own floor)"
    )
    for name, run in runs.items():
        before, peak, after = run["rss"]
        print(
            f"server RSS, {name:14s}: before {before:.0f} MiB, peak {peak:.0f} MiB, "
            f"10 s after {after:.0f} MiB"
        )


if __name__ == "__main__":
    main()
