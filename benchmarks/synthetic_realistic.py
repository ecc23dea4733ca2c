"""The realistic preset of bench_synthetic.py: every objective on the same rows of
`RealisticActivations` (training/synthetic.py), scored by training/synthetic_metrics.py.

4,096 true features in 256 dimensions (Zipfian firing, hierarchies with mutually exclusive
children, low-rank correlations, per-feature magnitudes, a bias), a dictionary of 1,024 (narrower
than the truth, as on real models), every objective at the true L0 of the 1,024 most frequent
features (k for the TopK family, target_l0 for the penalty objectives).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from training.config import (
    DictionaryShape,
    LoggingConfig,
    ObjectiveConfig,
    OptimConfig,
    ResampleConfig,
    TrainConfig,
)
from training.distributed import DistInfo
from training.initialization import input_scale
from training.member import Member
from training.synthetic import GroundTruthBatch, RealisticActivations, RealisticConfig
from training.synthetic_metrics import GroundTruthMetrics, ground_truth_metrics
from training.trainer import Trainer

OBJECTIVES = (
    "matryoshka_batchtopk",
    "batchtopk",
    "topk_auxk",
    "jumprelu",
    "relu_l1_2024",
    "relu_l1",
)
CURVES = ("batchtopk", "matryoshka_batchtopk")
"""Objectives whose F1 and MCC are also measured during training."""


def objective_config(name: str, l0: float, dead_tokens: int) -> ObjectiveConfig:
    """Each objective at mean L0 `l0`: k for the TopK family, the target-L0 controller else."""
    k = max(1, round(l0))
    if name in ("topk_auxk", "batchtopk", "matryoshka_batchtopk"):
        return ObjectiveConfig(name=name, k=k, dead_tokens=dead_tokens)
    start = {"relu_l1": 1.0, "relu_l1_2024": 1.0, "jumprelu": 0.1}[name]
    extra = (
        {"jumprelu_init_threshold": 0.1, "jumprelu_bandwidth": 0.05} if name == "jumprelu" else {}
    )
    return ObjectiveConfig(
        name=name, l1_coefficient=start, target_l0=float(k), target_l0_rate=0.02, **extra
    )


class Rows:
    """The training rows, generated once and replayed to every objective (float16 in memory)."""

    def __init__(self, truth: RealisticActivations, n_batches: int) -> None:
        self.data = torch.empty(n_batches, truth.batch_size, truth.cfg.d_in, dtype=torch.float16)
        for i in range(n_batches):
            self.data[i] = truth.batch(i)
        self.position = 0

    def __iter__(self) -> Iterator[Tensor]:
        while self.position < self.data.shape[0]:
            self.position += 1
            yield self.data[self.position - 1].float()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


def train(
    name: str,
    args: argparse.Namespace,
    truth: RealisticActivations,
    rows: Rows,
    curve_eval: list[GroundTruthBatch] | None,
    out: Path,
    steps: int | None = None,
) -> tuple[Any, float, list[tuple[int, float, float]]]:
    """(dictionary, training samples/s without the curve evaluations, [(samples, F1, MCC)])."""
    steps = steps or rows.data.shape[0]
    cfg = TrainConfig(
        total_tokens=steps * args.batch,
        batch_size=args.batch,
        out_dir=out / name,
        checkpoint_every_steps=0,
        dictionary=DictionaryShape(d_sae=args.d_sae, init_tokens=8 * args.batch),
        objective=objective_config(name, truth.top_l0(args.d_sae), args.dead_tokens),
        optim=OptimConfig(lr=args.lr, warmup_steps=100),
        resample=ResampleConfig(enabled=name == "relu_l1"),
        logging=LoggingConfig(
            log_every_steps=200,
            progress=False,
            plots=False,
            eval_every_steps=max(1, steps // args.curve_points) if curve_eval else 0,
        ),
    )
    curve: list[tuple[int, float, float]] = []
    eval_seconds = 0.0

    def evaluator(d: Any, scale: float, output_scale: float = 1.0) -> dict[str, float]:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        assert curve_eval is not None
        m = ground_truth_metrics(d, truth, curve_eval, input_scale=scale)
        if scale != 1.0:  # the live dictionary during training, not the final call
            curve.append(
                ((len(curve) + 1) * cfg.logging.eval_every_steps * args.batch, m.f1, m.mcc)
            )
        eval_seconds += time.perf_counter() - t0
        return {"f1": m.f1, "mcc": m.mcc}

    rows.position = 0
    t0 = time.perf_counter()
    result = Trainer(cfg, d_in=truth.cfg.d_in, evaluator=evaluator if curve_eval else None).fit(
        rows
    )
    seconds = time.perf_counter() - t0 - eval_seconds
    return result.dictionary, result.tokens / seconds, curve


def speed_ratio(
    args: argparse.Namespace, truth: RealisticActivations, rows: Rows
) -> dict[str, float]:
    """Samples/s of topk_auxk and matryoshka_batchtopk side by side: both train on the same
    rows, one step of each in turn (after `args.speed_warmup` steps each, so AuxK and the
    thresholds are live), and each rate is the batch over its median step time; load on a
    shared machine then hits both alike."""
    names = ("topk_auxk", "matryoshka_batchtopk")
    steps = args.speed_warmup + args.speed_steps
    members = {}
    for name in names:
        cfg = TrainConfig(
            total_tokens=steps * args.batch,
            batch_size=args.batch,
            dictionary=DictionaryShape(d_sae=args.d_sae),
            # AuxK live from the start of the timed steps, as in a long run.
            objective=objective_config(
                name, truth.top_l0(args.d_sae), args.speed_warmup * args.batch // 2
            ),
            optim=OptimConfig(lr=args.lr, warmup_steps=100),
            resample=ResampleConfig(enabled=False),
        )
        m = Member(name, cfg, truth.cfg.d_in, torch.device("cpu"), DistInfo())
        sample = rows.data[:8].flatten(0, 1).float()
        m.initialize(sample, input_scale(sample))
        members[name] = m
    times: dict[str, list[float]] = {n: [] for n in names}
    for step in range(steps):
        x = rows.data[step % rows.data.shape[0]].float()
        for name, m in members.items():
            t0 = time.perf_counter()
            m.train_step(x, step, args.batch, want_metrics=False, tokens_before=step * args.batch)
            if step >= args.speed_warmup:
                times[name].append(time.perf_counter() - t0)
    return {n: args.batch / statistics.median(t) for n, t in times.items()}


def draw(
    results: dict[str, GroundTruthMetrics],
    rates: dict[str, float],
    curves: dict[str, list[tuple[int, float, float]]],
    plots: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    keys = (
        "f1",
        "mcc",
        "absorption",
        "uniqueness",
        "explained_variance",
        "shrinkage",
        "l0",
        "dead_fraction",
    )
    names = list(results)
    fig, axes = plt.subplots(3, 3, figsize=(13, 10))
    for ax, key in zip(axes.flat, (*keys, "samples/s"), strict=True):
        values = [rates[n] if key == "samples/s" else getattr(results[n], key) for n in names]
        ax.barh(names, values, color=["C3" if n == "matryoshka_batchtopk" else "C0" for n in names])
        ax.set_title(key)
    fig.suptitle("Realistic synthetic ground truth: 4,096 true features, d_in 256, d_sae 1,024")
    fig.tight_layout()
    fig.savefig(plots / "synthetic_realistic.png", dpi=90)
    plt.close(fig)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        xs = [c[0] for c in curve]
        a1.plot(xs, [c[1] for c in curve], marker="o", label=name)
        a2.plot(xs, [c[2] for c in curve], marker="o", label=name)
    for ax, label in ((a1, "F1"), (a2, "MCC")):
        ax.set_xlabel("samples seen")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "synthetic_curves.png", dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace, out: Path) -> None:
    syn = dataclasses.replace(RealisticConfig(), seed=args.seed)
    truth = RealisticActivations(syn, args.batch)
    held = truth.held_out(offset=10**9)
    n_batches = args.samples // args.batch
    t0 = time.perf_counter()
    rows = Rows(truth, n_batches)
    gen_seconds = time.perf_counter() - t0
    evals = [held.sample(i) for i in range(max(1, args.eval_samples // args.batch))]
    curve_eval = evals[: max(1, len(evals) // 4)]
    l0 = truth.top_l0(args.d_sae)
    print(
        f"realistic: {syn.n_features} true features in d_in={syn.d_in} ({syn.n_trees} hierarchies,"
        f" {len(truth.parent_child_pairs())} parent-child pairs), true L0 {truth.true_l0:.2f}, "
        f"L0 of the {args.d_sae} most frequent {l0:.2f} -> k = {round(l0)}; d_sae={args.d_sae}; "
        f"{n_batches * args.batch:,} samples in batches of {args.batch} (generated once in "
        f"{gen_seconds:.0f} s, {n_batches * args.batch / gen_seconds:,.0f} samples/s); "
        f"eval on {len(evals) * args.batch:,} held-out samples",
        flush=True,
    )
    if args.speed_steps:
        speed = speed_ratio(args, truth, rows)
        ratio = speed["matryoshka_batchtopk"] / speed["topk_auxk"]
        print(
            f"side by side (alternating single steps, median of {args.speed_steps} after "
            f"{args.speed_warmup}): topk_auxk {speed['topk_auxk']:,.0f} samples/s, "
            f"matryoshka_batchtopk {speed['matryoshka_batchtopk']:,.0f} samples/s, "
            f"ratio {ratio:.2f}"
        )
    results: dict[str, GroundTruthMetrics] = {}
    rates: dict[str, float] = {}
    curves: dict[str, list[tuple[int, float, float]]] = {}
    header = (
        f"{'objective':22s} {'F1':>6s} {'MCC':>6s} {'absorb':>7s} {'unique':>7s} "
        f"{'EV':>6s} {'shrink':>7s} {'L0':>6s} {'dead':>6s} {'samples/s':>10s}"
    )
    print(header, flush=True)
    for name in args.objectives:
        d, rate, curve = train(name, args, truth, rows, curve_eval if name in CURVES else None, out)
        m = ground_truth_metrics(d, truth, evals)
        results[name], rates[name] = m, rate
        if curve:
            curves[name] = curve
        print(
            f"{name:22s} {m.f1:6.3f} {m.mcc:6.3f} {m.absorption:7.3f} {m.uniqueness:7.3f} "
            f"{m.explained_variance:6.3f} {m.shrinkage:7.3f} {m.l0:6.2f} {m.dead_fraction:6.1%} "
            f"{rate:10,.0f}",
            flush=True,
        )
    for name, curve in curves.items():
        print(
            f"{name} F1/MCC vs samples: "
            + ", ".join(f"{s / 1e6:.2f}M {f:.3f}/{c:.3f}" for s, f, c in curve)
        )
    draw(results, rates, curves, Path(args.plots))
    print(f"plots: {args.plots}/synthetic_realistic.png, {args.plots}/synthetic_curves.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("realistic preset")
    g.add_argument(
        "--samples", type=int, default=12 * 2**20, help="training samples (12.6M, see README)"
    )
    g.add_argument("--eval-samples", type=int, default=65536)
    g.add_argument("--objectives", nargs="*", default=list(OBJECTIVES), choices=OBJECTIVES)
    g.add_argument("--dead-tokens", type=int, default=262_144, help="AuxK dead window")
    g.add_argument("--curve-points", type=int, default=6)
    g.add_argument("--speed-warmup", type=int, default=300, help="steps before timing")
    g.add_argument("--speed-steps", type=int, default=300, help="timed steps (0: skip)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--plots", default="docs", help="folder for the PNGs")
