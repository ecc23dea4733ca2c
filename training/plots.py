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
