"""PNG plots drawn at the end of a run from metrics.jsonl: loss curves, L0, feature density.

matplotlib with the Agg backend (no display needed); files are written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae.atomic import atomic_path
from training.metrics import read_metrics


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def draw_plots(out_dir: Path, densities: dict[str, torch.Tensor]) -> list[Path]:
    """Write loss.png, l0.png and feature_density.png into `out_dir/plots`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(out_dir) if "loss" in r]
    members = sorted({r["member"] for r in rows} | set(densities))
    plots = Path(out_dir) / "plots"
    written: list[Path] = []

    for key, fname, ylabel, log in (
        ("loss", "loss.png", "training loss", True),
        ("l0", "l0.png", "L0 (active features per token)", False),
        ("fvu", "fvu.png", "fraction of variance unexplained", True),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in members:
            pts = [(r["tokens"], r[key]) for r in rows if r["member"] == m and key in r]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, label=m)
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        if len(members) > 1:
            ax.legend(fontsize=7)
        written.append(_save(fig, plots / fname))
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, density in densities.items():
        log10 = torch.log10(density.clamp_min(1e-10)).numpy()
        ax.hist(log10, bins=50, range=(-10, 0), histtype="step", label=m)
    ax.set_xlabel("log10 feature density (dead features at -10)")
    ax.set_ylabel("features")
    if len(densities) > 1:
        ax.legend(fontsize=7)
    written.append(_save(fig, plots / "feature_density.png"))
    plt.close(fig)
    return written


def draw_frontier(out_dir: Path, figures: dict[str, dict[str, float]]) -> Path | None:
    """plots/frontier.png: held-out loss recovered (or explained variance, without the
    model) against L0, one point per sweep member: the sparsity/fidelity trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "loss_recovered" if all("loss_recovered" in f for f in figures.values()) else None
    key = key or "explained_variance"
    points = {m: (f["l0"], f[key]) for m, f in figures.items() if "l0" in f and key in f}
    if len(points) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, (l0, y) in sorted(points.items(), key=lambda kv: kv[1][0]):
        ax.scatter([l0], [100 * y], s=18)
        ax.annotate(m, (l0, 100 * y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    tokens = next(iter(figures.values())).get("eval_tokens", 0)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token, held out)")
    ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
    ax.set_title(f"held-out frontier ({int(tokens):,} tokens)", fontsize=9)
    ax.grid(alpha=0.3)
    path = _save(fig, Path(out_dir) / "plots" / "frontier.png")
    plt.close(fig)
    return path
