"""Training throughput, and the same as a fraction of this machine's matmul peak, both
measured in one run on the same shapes.

A dictionary training step is six matmuls of B x D x F (encoder and decoder forward, and two
gradients of each backward: the encoder's input gradient is needed because b_dec is
subtracted from the input before encoding): 12 B D F floating-point operations, plus
elementwise work, the optimizer step and bookkeeping. The "peak" is those same six matmuls
timed bare, so the ratio says how much of the achievable time the trainer spends on anything
else.
Trainer time is the difference of two runs of different lengths (start-up cancels out).

    .venv/bin/python benchmarks/bench_train.py
    .venv/bin/python benchmarks/bench_train.py --d-in 768 --d-sae 24576 --batch 4096 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from training.config import DictionaryShape, LoggingConfig, ObjectiveConfig, TrainConfig
from training.trainer import Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(b: int, d: int, f: int, device: torch.device, reps: int) -> float:
    """FLOP/s of the six matmuls of one training step, timed bare (best of `reps`)."""
    x = torch.randn(b, d, device=device)
    w_enc = torch.randn(d, f, device=device)
    w_dec = torch.randn(f, d, device=device)
    acts = torch.randn(b, f, device=device)
    grad_out = torch.randn(b, d, device=device)

    def step() -> None:
        _ = x @ w_enc  # encoder forward
        _ = acts @ w_dec  # decoder forward
        g_acts = grad_out @ w_dec.T  # decoder backward: d acts
        _ = acts.T @ grad_out  # decoder backward: d W_dec
        _ = x.T @ g_acts  # encoder backward: d W_enc
        _ = g_acts @ w_enc.T  # encoder backward: d (x - b_dec), for b_dec's gradient

    step()
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 12 * b * d * f / best


def train_seconds(cfg: TrainConfig, d_in: int, batches: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    Trainer(cfg, d_in).fit(batches)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=12, help="steps of the longer run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--objectives", nargs="+", default=["relu_l1", "topk_auxk"])
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    b, d, f = args.batch, args.d_in, args.d_sae
    short = max(2, args.steps // 3)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, d, generator=gen).to(device) for _ in range(args.steps)]

    print(
        f"shapes B={b} D={d} F={f} on {device} ({torch.get_num_threads()} threads), "
        f"autocast {args.autocast}, compile {args.compile}"
    )
    print(
        f"{'objective':12s} {'tokens/s':>10s} {'step ms':>9s} {'matmul peak':>12s} {'fraction':>9s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.objectives:
            cfg = TrainConfig(
                total_tokens=args.steps * b,
                batch_size=b,
                out_dir=Path(tmp) / name,
                device=str(device),
                autocast=args.autocast,
                compile=args.compile,
                checkpoint_every_steps=0,
                dictionary=DictionaryShape(d_sae=f, init_tokens=b, b_dec_init="mean"),
                objective=ObjectiveConfig(name=name, k=32),
                logging=LoggingConfig(log_every_steps=10**9, progress=False, plots=False),
            )
            shorter = dataclasses.replace(cfg, total_tokens=short * b)
            train_seconds(shorter, d, batches)  # warm-up: allocator, kernels, compile
            long_s = train_seconds(cfg, d, batches)
            short_s = train_seconds(shorter, d, batches)
            step_s = max(long_s - short_s, 1e-9) / (args.steps - short)
            peak = matmul_peak(b, d, f, device, reps=5)
            achieved = 12 * b * d * f / step_s
            print(
                f"{name:12s} {b / step_s:10,.0f} {step_s * 1e3:9.1f} "
                f"{peak / 1e9:9.1f} GF/s {achieved / peak:9.1%}"
            )


if __name__ == "__main__":
    main()
