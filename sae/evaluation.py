"""The held-out figures of a dictionary, named and printed the same way everywhere.

`sae train` measures them on tokens it did not train on (training/heldout.py) and saves them
in the dictionary's cfg.json as `provenance["eval"]`; the training summary, `sae info`, the
demo report and the browser all read them from there through this module, so no two places
can disagree.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Figure(NamedTuple):
    key: str
    """Key in provenance["eval"] (and `eval/<key>` in metrics.jsonl)."""
    label: str
    """How it is printed."""
    percent: bool
    """Printed as a percentage."""


FIGURES = (
    Figure("explained_variance", "explained variance", True),
    Figure("fvu", "FVU", False),
    Figure("l0", "L0", False),
    Figure("dead_fraction", "never fired", True),
    Figure("dense_fraction", "dense", True),
    Figure("loss_recovered", "loss recovered", True),
    Figure("kl_div", "KL", False),
)
"""The figures users read, in the order they are printed."""


def heldout_figures(provenance: dict[str, Any]) -> dict[str, float]:
    """The held-out figures saved with a dictionary (empty if it was not evaluated)."""
    figures = provenance.get("eval") or {}
    return {k: float(v) for k, v in figures.items() if isinstance(v, int | float)}


def format_figure(figure: Figure, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if figure.percent else f"{value:.4g}"


def summary_line(figures: dict[str, Any]) -> str:
    """One line: 'held-out 100,000 tokens: explained variance 79.4%, L0 31.9, ...'."""
    if not figures:
        return "no held-out evaluation"
    parts = [
        f"{f.label} {format_figure(f, float(figures[f.key]))}"
        for f in FIGURES
        if figures.get(f.key) is not None
    ]
    return f"held-out {int(figures.get('eval_tokens', 0)):,} tokens: " + ", ".join(parts)
