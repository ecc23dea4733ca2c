"""Training step time with the dense backward and with the sparse-gradient path, side by side,
measured in one run on the same batches.

A dense relu step is five matmuls of B x D x F (encoder forward, decoder forward, the codes'
and W_dec's gradients through the decoder, W_enc's gradient); a dense topk step decodes
sparsely already, so three. The sparse path (TrainConfig.sparse_grad, sae/sparse_grad.py)
keeps only the encoder forward dense: "floor" is that one matmul timed bare, the least a step
can take, and "sparse/floor" says how much the rest of the step adds.

Steps are whole member steps (forward, backward, decoder constraint, Adam, firing counters).
Their speed depends on how many codes fire, so each dictionary starts with its encoder bias
set to give `--l0` active features per token (topk: k = --l0), the state of a dictionary
after the sparsity warm-up; the first steps of an L1 run, when most features fire, run dense.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_train.py --threads 1
    .venv/bin/python benchmarks/bench_train.py --d-in 768 --d-sae 24576 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from training.config import DictionaryShape, ObjectiveConfig, ResampleConfig, TrainConfig
from training.distributed import DistInfo
from training.member import Member


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def encoder_matmul_seconds(
    b: int, d: int, f: int, device: torch.device, reps: int, autocast: str
) -> float:
    """The one B x D x F matmul the sparse path keeps (the pre-activations), timed bare."""
    x = torch.randn(b, d, device=device)
    w_enc = torch.randn(d, f, device=device)
    bias = torch.randn(f, device=device)
    best = float("inf")
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
        torch.addmm(bias, x, w_enc)
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            torch.addmm(bias, x, w_enc)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return best


def member(args: argparse.Namespace, name: str, sparse: bool, x0: torch.Tensor) -> Member:
    """A member whose codes fire about args.l0 times per token on x0."""
    b, d, f = args.batch, args.d_in, args.d_sae
    cfg = TrainConfig(
        total_tokens=10**9,
        batch_size=b,
        device=args.device,
        autocast=args.autocast,
        compile=args.compile,
        sparse_grad=sparse,
        dictionary=DictionaryShape(d_sae=f, b_dec_init="mean"),
        objective=ObjectiveConfig(name=name, k=args.l0, l1_warmup_fraction=0.0),
        resample=ResampleConfig(enabled=False),
    )
    device = torch.device(args.device)
    m = Member(name, cfg, d, device, DistInfo())
    m.initialize(x0, 1.0)
    with torch.no_grad():
        pre = m.dictionary.pre_activations(x0.to(device))
        m.dictionary.b_enc.sub_(pre.flatten().topk(args.l0 * x0.shape[0]).values.min())
    return m


def step_seconds(m: Member, batches: list[torch.Tensor], device: torch.device) -> list[float]:
    """Seconds of each step after the first (allocator, kernels and compile warm up there)."""
    times = []
    tokens = 0
    for step, x in enumerate(batches):
        sync(device)
        t0 = time.perf_counter()
        m.train_step(x, step, tokens + x.shape[0], want_metrics=False, tokens_before=tokens)
        sync(device)
        tokens += x.shape[0]
        if step > 0:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--l0", type=int, default=32, help="active features per token")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per path")
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
    gen = torch.Generator().manual_seed(0)
    # Correlated inputs (a random mixing of Gaussian sources), so features differ in scale.
    mixing = torch.randn(d, d, generator=gen) / d**0.5
    batches = [
        (torch.randn(b, d, generator=gen) @ mixing).to(device) for _ in range(args.steps + 1)
    ]
    floor = encoder_matmul_seconds(b, d, f, device, reps=3, autocast=args.autocast)
    print(
        f"shapes B={b} D={d} F={f} L0={args.l0} on {device} ({torch.get_num_threads()} threads), "
        f"autocast {args.autocast}, compile {args.compile}; floor (encoder matmul) "
        f"{floor * 1e3:.1f} ms"
    )
    print(
        f"{'objective':12s} {'dense ms':>9s} {'sparse ms':>10s} {'dense tok/s':>12s} "
        f"{'sparse tok/s':>13s} {'speed-up':>9s} {'sparse/floor':>13s}"
    )
    for name in args.objectives:
        median = {}
        for sparse in (False, True):
            median[sparse] = statistics.median(
                step_seconds(member(args, name, sparse, batches[0]), batches, device)
            )
        dense_s, sparse_s = median[False], median[True]
        print(
            f"{name:12s} {dense_s * 1e3:9.1f} {sparse_s * 1e3:10.1f} {b / dense_s:12,.0f} "
            f"{b / sparse_s:13,.0f} {dense_s / sparse_s:8.2f}x {sparse_s / floor:12.2f}x"
        )


if __name__ == "__main__":
    main()
