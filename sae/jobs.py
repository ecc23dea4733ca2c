"""Several `sae train` runs at once, as child processes sharing the machine's cores.

Two small dictionaries train faster side by side, one process and one thread each, than in one
process that steps both on every batch with all threads: their matmuls are too small to keep a
second thread busy (benchmarks/bench_parallel_train.py measures the two side by side). Each
child logs to its own file; one progress bar shows the tokens all of them have trained, read
from their metrics.jsonl. Ctrl-C reaches the children too: each saves a checkpoint and stops,
and the same command with --resume continues them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sae.errors import UserError


@dataclass
class TrainJob:
    """One `sae train` command line and what it is expected to produce."""

    name: str
    argv: list[str]
    """Arguments after `sae` (starting with "train"); must include --out-dir `run_dir`."""
    run_dir: Path
    tokens: int
    """Tokens the run will train (for the progress bar)."""


def tokens_done(run_dir: Path) -> int:
    """The last `tokens` logged in run_dir/metrics.jsonl (0 before the first row)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    done = 0
    for line in path.read_text().splitlines():
        try:
            done = max(done, int(json.loads(line).get("tokens", 0)))
        except (ValueError, AttributeError):
            continue  # a row being written
    return done


def run_parallel(jobs: list[TrainJob], poll_s: float = 1.0) -> None:
    """Run every job at once, each on cores // len(jobs) threads; a UserError naming the first
    that failed and its log."""
    from sae.progress import progress_bar

    threads = max(1, (os.cpu_count() or 1) // max(1, len(jobs)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for job in jobs:
        log = job.run_dir.parent / f"{job.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            cmd = [sys.executable, "-m", "sae.cli", *job.argv, "--logging.progress", "false"]
            procs[job.name] = (subprocess.Popen(cmd, stdout=out, stderr=out, env=env), log)
    total = sum(j.tokens for j in jobs)
    try:
        with progress_bar(total=total, unit="tok", unit_scale=True, desc="train") as bar:
            while any(p.poll() is None for p, _ in procs.values()):
                time.sleep(poll_s)
                done = sum(min(tokens_done(j.run_dir), j.tokens) for j in jobs)
                bar.update(done - bar.n)  # a run's last step may overshoot its budget
    finally:
        for p, _ in procs.values():
            p.wait()  # after Ctrl-C: each child checkpoints and exits
    for name, (p, log) in procs.items():
        if p.returncode != 0:
            lines = log.read_text(errors="replace").strip().splitlines()
            raise UserError(
                f"training {name} failed (exit {p.returncode}): "
                f"{lines[-1] if lines else 'no output'} (log: {log})"
            )
