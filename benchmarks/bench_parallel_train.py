"""Two dictionaries on one machine: one `sae train` sweep stepping both on every batch with
all cores' threads, against one `sae train` process per dictionary with cores / 2 threads each
(sae/jobs.py, what `sae demo` does). Both arms train relu_l1 and topk_auxk on the same cache
for the same tokens, one arm after the other in this run; prints wall time and the ratio.

    .venv/bin/python benchmarks/bench_parallel_train.py --cache demo_out/cache --tokens 300000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sae.jobs import TrainJob, run_parallel


def common(args: argparse.Namespace, out: Path) -> list[str]:
    return ["train", "--cache", str(args.cache), "--out-dir", str(out),
            "--dictionary.d-sae", str(args.d_sae), "--total-tokens", str(args.tokens),
            "--batch-size", "1024", "--optim.lr", "2e-3", "--autocast", args.autocast,
            "--objective.k", "32", "--objective.target-l0", "28", "--eval.tokens", "20000",
            "--eval.loss-recovered", "false", "--checkpoint-every-steps", "0"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", required=True, help="an activation cache (sae cache)")
    p.add_argument("--tokens", type=int, default=300_000)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--autocast", default="auto")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "sae.cli",
            *common(args, root / "sweep"),
            "--sweep",
            "objective.name=relu_l1,topk_auxk",
            "--logging.progress",
            "false",
        ]
        subprocess.run(cmd, check=True, capture_output=True)  # fmt: skip
        sweep = time.perf_counter() - t
        t = time.perf_counter()
        jobs = [TrainJob(m, [*common(args, root / m), "--objective.name", m], root / m,
                         args.tokens) for m in ("relu_l1", "topk_auxk")]  # fmt: skip
        run_parallel(jobs)
        parallel = time.perf_counter() - t
    print(f"relu_l1 + topk_auxk, d_sae {args.d_sae}, {args.tokens:,} tokens each, {cores} cores")
    print(f"one sweep process, {cores} threads:        {sweep:7.1f} s")
    print(f"two processes, {max(1, cores // 2)} thread(s) each:      {parallel:7.1f} s")
    print(f"speed-up of the two processes: {sweep / parallel:.2f}x")


if __name__ == "__main__":
    main()
