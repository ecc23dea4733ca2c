"""The records of the feature store (analysis/store.py): what readers get back, and the
`FeatureArrays` an analysis hands to `FeatureStore.replace_statistics`.

Plain frozen dataclasses over numpy and the standard library, so the server and users can
hold them without a language-model stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


def token_text(vocab: list[str], token_id: int) -> str:
    """Display string of a token id; `<id>` for an id the stored vocabulary does not cover."""
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"<{token_id}>"


# -- records returned to readers ------------------------------------------------------------


@dataclass(frozen=True)
class StoreMeta:
    """What was analysed and how."""

    dictionary: str
    """Dictionary name or path the statistics belong to."""
    hook_name: str
    """TransformerLens hook the dictionary reads."""
    model_name: str
    """Language model the text was run through."""
    d_in: int
    """Width of the hooked activation."""
    d_sae: int
    """Number of features."""
    n_tokens: int
    """Tokens analysed."""
    n_top: int
    """Top-activating examples kept per feature."""
    n_quantiles: int
    """Activation-quantile buckets of the sampled examples."""
    examples_per_quantile: int
    """Sampled examples per quantile bucket."""
    context_before: int
    """Tokens kept before the activating token in each example window."""
    context_after: int
    """Tokens kept after the activating token in each example window."""
    histogram_edges: list[float]
    """Bin edges shared by every feature's activation histogram (log-spaced)."""
    created_at: str
    """ISO-8601 UTC time the analysis finished."""
    generation: int
    """Incremented by every re-analysis."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: text source, dtype, logit-effect method, ..."""


@dataclass(frozen=True)
class TokenEffect:
    """One output token a feature's decoder direction promotes (value > 0) or suppresses."""

    token: str
    token_id: int
    value: float
    """Direct logit effect of a unit-norm decoder direction (see analysis/analyze.py)."""


@dataclass(frozen=True)
class Histogram:
    """Activation histogram over the tokens where the feature fires (activation > 0)."""

    edges: list[float]
    """len(counts) + 1 bin edges; values outside are counted in the first/last bin."""
    counts: list[int]


@dataclass(frozen=True)
class Label:
    """A user- or tool-written explanation of a feature."""

    id: int
    feature_id: int
    text: str
    author: str
    created_at: str
    """ISO-8601 UTC."""


@dataclass(frozen=True)
class FeatureSummary:
    """One row of a feature list or search result."""

    feature_id: int
    density: float
    """Fraction of analysed tokens where the feature fires."""
    mean_act: float
    """Mean activation over the tokens where it fires (0 if it never fires)."""
    max_act: float
    top_tokens: list[str]
    """The tokens at the maxima of the top examples, distinct, strongest first."""
    label: str | None
    """The most recent label, if any."""


@dataclass(frozen=True)
class FeatureRecord:
    """Everything the store knows about one feature except its examples."""

    feature_id: int
    n_fires: int
    """Number of analysed tokens where the feature fires."""
    density: float
    mean_act: float
    max_act: float
    top_tokens: list[str]
    histogram: Histogram
    promoted: list[TokenEffect]
    """Output tokens the decoder direction raises most, strongest first."""
    suppressed: list[TokenEffect]
    """Output tokens it lowers most, strongest (most negative) first."""
    labels: list[Label]
    """Oldest first."""


@dataclass(frozen=True)
class Example:
    """A token window around one activation of a feature."""

    tokens: list[str]
    token_ids: list[int]
    acts: list[float]
    """The feature's activation on every token of the window."""
    max_index: int
    """Index in `tokens` of the activating token the example was chosen for."""
    max_act: float
    """Activation at `max_index`."""
    sequence: int
    """Index of the context (packed token sequence) in the analysed stream."""
    position: int
    """Position of the activating token inside that context."""
    quantile: int | None = None
    """For quantile examples: bucket 0 (weakest) .. n_quantiles-1 (strongest); else None."""


# -- what an analysis hands to the store -----------------------------------------------------


@dataclass
class FeatureArrays:
    """The full result of one analysis, as numpy arrays (F = d_sae, N = n_top, W = window,
    Q = sampled examples, B = histogram bins, K = logit-effect list length).

    Empty example slots have sequence -1; padding tokens in windows have id -1.
    """

    meta: StoreMeta
    vocab: list[str]
    """Display string of every token id."""
    n_fires: np.ndarray  # [F] int64
    sum_acts: np.ndarray  # [F] float64, over firing tokens
    max_act: np.ndarray  # [F] float32
    hist_counts: np.ndarray  # [F, B] int64
    top_token_ids: np.ndarray  # [F, N, W] int32
    top_acts: np.ndarray  # [F, N, W] float32
    top_sequence: np.ndarray  # [F, N] int64
    top_position: np.ndarray  # [F, N] int32
    q_token_ids: np.ndarray  # [F, Q, W] int32
    q_acts: np.ndarray  # [F, Q, W] float32
    q_sequence: np.ndarray  # [F, Q] int64
    q_position: np.ndarray  # [F, Q] int32
    q_bucket: np.ndarray  # [F, Q] int16
    promoted_ids: np.ndarray  # [F, K] int32
    promoted_values: np.ndarray  # [F, K] float32
    suppressed_ids: np.ndarray  # [F, K] int32
    suppressed_values: np.ndarray  # [F, K] float32

    ARRAY_FIELDS: ClassVar[tuple[str, ...]] = (
        "n_fires",
        "sum_acts",
        "max_act",
        "hist_counts",
        "top_token_ids",
        "top_acts",
        "top_sequence",
        "top_position",
        "q_token_ids",
        "q_acts",
        "q_sequence",
        "q_position",
        "q_bucket",
        "promoted_ids",
        "promoted_values",
        "suppressed_ids",
        "suppressed_values",
    )

    def validate(self) -> None:
        F = self.meta.d_sae
        for name in self.ARRAY_FIELDS:
            arr = getattr(self, name)
            if arr.shape[0] != F:
                raise ValueError(f"FeatureArrays.{name} has {arr.shape[0]} rows, d_sae is {F}")
