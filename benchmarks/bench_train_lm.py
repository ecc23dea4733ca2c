"""`sae train-lm` step time: eager float32 against bf16 autocast and torch.compile, measured
side by side in one run on the bundled model's shape.

The bundled model must retrain in about 30 minutes on 2 cores. Its step is dominated by the
unembedding (d_model x vocab, 4096 wide) and the softmax over it; bf16 matmuls (AVX512-BF16
or AMX on CPU, tensor cores on GPU) and the fusion of the loss by torch.compile are what make
room for more tokens in that budget, where the hardware has native bf16; where it has not
(an AVX2-only CPU), bf16 is emulated and float32 is faster, which is why the default autocast
is `auto` (lm.config.resolve_autocast). Each variant runs the real `lm.train.train_step` on
random windows of the real train stream; the figure is the median step time after warm-up
(compilation happens in the warm-up steps). A second table times the optimizer step alone
on the block's matrices: AdamW, torch.optim.Muon and this project's Muon.

    .venv/bin/python benchmarks/bench_train_lm.py
    .venv/bin/python benchmarks/bench_train_lm.py --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

import numpy as np
import torch

from activations.model import BUNDLED_DIR
from lm import data as lm_data
from lm import optim as lm_optim
from lm import train as train_lm
from lm.config import TrainLMConfig, native_bf16, resolve_autocast
from lm.optim import MuonAdamW, is_hidden_matrix

VARIANTS = (
    ("eager float32", dict(compile=False, autocast="float32")),
    ("eager bf16", dict(compile=False, autocast="bfloat16")),
    ("compiled float32", dict(compile=True, autocast="float32")),
    ("compiled bf16", dict(compile=True, autocast="bfloat16")),
)


def step_seconds(
    cfg: TrainLMConfig, tokenizer: Any, stream: np.ndarray, warmup: int, steps: int
) -> float:
    model = train_lm.build_model(cfg, tokenizer)
    optimizer = lm_optim.make_optimizer(model, cfg)
    forward = train_lm.compiled(model, cfg)
    bos = tokenizer.bos_token_id
    times = []
    for step in range(warmup + steps):
        x_BS = lm_data.sample_batch(stream, bos, cfg, step).to(cfg.device)
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_lm.train_step(forward, optimizer, x_BS, cfg, step)  # .item() synchronises
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def optimizer_step_ms(make: Any, model: torch.nn.Module, steps: int) -> float:
    """Median milliseconds of `make(params).step()` over random gradients on `model`'s block."""
    params = [p for n, p in model.named_parameters() if is_hidden_matrix(n, p)]
    optimizer = make(params)
    times = []
    for i in range(steps + 2):
        for p in params:
            p.grad = torch.randn_like(p)
        t0 = time.perf_counter()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def compare_optimizers(base: TrainLMConfig, tokenizer: Any, steps: int) -> None:
    """The optimizer step alone on the block's four matrices: torch.optim.Muon orthogonalises
    in bf16 on every device, which is emulated (slow) on a CPU without native bf16."""
    model = train_lm.build_model(base, tokenizer)
    ns_dtype = torch.bfloat16 if native_bf16(base.device) else torch.float32
    rows = (
        ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=base.lr)),
        ("torch.optim.Muon (bf16)", lambda ps: torch.optim.Muon(ps, lr=base.lr)),
        (
            f"lm_optim.MuonAdamW ({str(ns_dtype).split('.')[-1]})",
            lambda ps: MuonAdamW([{"params": ps, "muon": True}], lr=base.lr, ns_dtype=ns_dtype),
        ),
    )
    print(f"{'optimizer step, block matrices':34s} {'ms':>7s}")
    for name, make in rows:
        print(f"{name:34s} {optimizer_step_ms(make, model, steps):7.1f}")


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps (compilation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = TrainLMConfig(device=args.device, threads=args.threads)
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_DIR)
    # Real token statistics matter little for timing; a random stream of the right vocabulary
    # avoids retokenising the corpus (the tokenizer is the shipped one).
    rng = np.random.default_rng(0)
    stream = rng.integers(1, len(tokenizer), size=2_000_000).astype(np.uint16)
    tokens = base.batch_size * base.n_ctx
    print(
        f"train-lm step: batch {base.batch_size} x context {base.n_ctx} = {tokens:,} tokens, "
        f"vocab {len(tokenizer)}, on {args.device} ({args.threads} threads, "
        f"native bf16: {'yes' if native_bf16(args.device) else 'no'})"
    )
    print(f"{'variant':26s} {'step ms':>9s} {'tokens/s':>10s} {'vs eager fp32':>14s}")
    reference = 0.0
    measured: dict[tuple[bool, str], float] = {}
    for name, overrides in VARIANTS:
        cfg = dataclasses.replace(base, **overrides)
        seconds = step_seconds(cfg, tokenizer, stream, args.warmup, args.steps)
        measured[cfg.compile, cfg.autocast] = seconds
        reference = reference or seconds
        print(
            f"{name:26s} {seconds * 1000:9.1f} {tokens / seconds:10,.0f} "
            f"{reference / seconds:13.2f}x"
        )
    default = resolve_autocast(base)
    seconds = measured[default.compile, default.autocast]
    print(
        f"default run ({base.steps} steps, autocast auto -> {default.autocast}, "
        f"compile {default.compile}): {base.steps * seconds / 60:.1f} min of optimisation"
    )
    compare_shapes(default, tokenizer, stream, args.warmup, args.steps)
    compare_optimizers(base, tokenizer, args.steps)


# Same 8,192 tokens a step; what heads and context cost in the default (fast) path. Here
# (2 cores, AVX512-BF16) context 512 cost 1.37x the step of context 256 (287.9 vs 210.1 ms),
# the CPU flash-attention backward taking about 40% of it; 8 heads against 4 at context 256
# were within noise (203.8 vs 210.1 ms). A 1-layer model gains little past 128 tokens of
# context, so the shipped model keeps 256 and spends the time on more steps.
SHAPES = ((256, 32, 4), (256, 32, 8), (512, 16, 8))


def compare_shapes(
    default: TrainLMConfig, tokenizer: Any, stream: np.ndarray, warmup: int, steps: int
) -> None:
    print(f"{'n_ctx x batch, heads':26s} {'step ms':>9s} {'vs shipped':>11s}")
    reference = 0.0
    for n_ctx, batch, heads in SHAPES:
        cfg = dataclasses.replace(default, n_ctx=n_ctx, batch_size=batch, n_heads=heads)
        seconds = step_seconds(cfg, tokenizer, stream, warmup, steps)
        reference = reference or seconds
        label = f"{n_ctx} x {batch}, {heads} heads"
        print(f"{label:26s} {seconds * 1000:9.1f} {reference / seconds:10.2f}x")


if __name__ == "__main__":
    main()
