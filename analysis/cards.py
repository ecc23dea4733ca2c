"""Plain-text cards of features, read from a feature store (`sae analyze --show`, the demo
report)."""

from __future__ import annotations

from analysis.store import FeatureStore


def pick_features(store: FeatureStore, n: int) -> list[int]:
    """n features spread evenly over those that fired, in feature_id order."""
    if n <= 0:
        return []
    meta = store.meta()
    alive = [s.feature_id for s in store.features(limit=meta.d_sae) if s.density > 0]
    if len(alive) <= n:
        return alive
    return [alive[round(i * (len(alive) - 1) / max(n - 1, 1))] for i in range(n)]


def _visible(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "⇥")


def format_feature(store: FeatureStore, feature_id: int, n_examples: int = 3) -> str:
    """A plain-text card: statistics, top tokens, logit effects, top examples."""
    rec = store.feature(feature_id)
    lines = [
        f"feature {rec.feature_id}: density {rec.density:.3%} ({rec.n_fires} tokens), "
        f"mean {rec.mean_act:.3g}, max {rec.max_act:.3g}"
        + (f", label: {rec.labels[-1].text!r}" if rec.labels else ""),
        "  top tokens: " + ", ".join(repr(_visible(t)) for t in rec.top_tokens[:10]),
    ]
    if rec.promoted:
        lines.append("  promotes:   " + ", ".join(
            f"{_visible(e.token)!r} {e.value:+.2f}" for e in rec.promoted[:6]))  # fmt: skip
        lines.append("  suppresses: " + ", ".join(
            f"{_visible(e.token)!r} {e.value:+.2f}" for e in rec.suppressed[:6]))  # fmt: skip
    for ex in store.top_examples(feature_id, limit=n_examples):
        text = "".join(
            f"[[{_visible(t)}]]" if i == ex.max_index else _visible(t)
            for i, t in enumerate(ex.tokens)
        )
        lines.append(f"  {ex.max_act:7.3f}  {text}")
    return "\n".join(lines)
