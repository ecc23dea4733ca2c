"""Request and response bodies, named by role (`...Request`, `...Response`, plain nouns for
parts), each field described, so /docs is the reference for HTTP users.

A feature is addressed as `DICTIONARY/FEATURE_ID` everywhere (URL path or JSON string), the
same address whatever server serves it. Hard upper bounds here stop absurd requests in
validation (422); the configurable ones are `ServerSettings` fields, enforced and written
into the OpenAPI schema by server/limits.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# [0-9], not \d: \d also matches other scripts' digits, which int() reads ('١٢' is 12).
ADDRESS_PATTERN = r"^([^/]+)/([0-9]{1,9})$"
ADDRESS_RE = re.compile(ADDRESS_PATTERN)

FeatureAddress = Annotated[
    str,
    StringConstraints(pattern=ADDRESS_PATTERN, max_length=200),
    Field(
        description="Feature address `DICTIONARY/FEATURE_ID`, e.g. `mlp0/12`.", examples=["mlp0/12"]
    ),
]
Text = Annotated[
    str, Field(min_length=1, max_length=20_000, description="Text to run through the model.")
]


class _Body(BaseModel):
    # Unknown fields are an error, not silently ignored: a typo in "strength" must not pass.
    model_config = ConfigDict(extra="forbid")


# -- errors -------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    code: str = Field(
        description="Stable machine-readable code, e.g. `not_found`, `validation_error`."
    )
    message: str = Field(description="One human-readable line.")
    detail: Any = Field(
        default=None, description="Extra structured information (validation errors, limits)."
    )


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx response."""

    error: ErrorInfo


# -- dictionaries -------------------------------------------------------------------------------
class DictionaryInfo(BaseModel):
    name: str = Field(description="Served name: the first part of feature addresses.")
    architecture: str = Field(description="Registered architecture (relu, topk, jumprelu, ...).")
    d_in: int = Field(description="Width of the hooked activation.")
    d_sae: int = Field(description="Number of features; feature ids are 0..d_sae-1.")
    hook_name: str | None = Field(description="TransformerLens hook the dictionary reads.")
    model_name: str | None = Field(description="Language model the dictionary was trained on.")
    has_analysis: bool = Field(
        description="Whether a feature store (statistics, top examples) exists."
    )
    analysis: dict[str, Any] | None = Field(
        default=None, description="Feature-store metadata (tokens analysed, ...)."
    )
    evaluation: dict[str, float] | None = Field(
        default=None,
        description="Held-out figures saved with the dictionary by `sae train` (eval_tokens, "
        "explained_variance, fvu, l0, dead_fraction, dense_fraction, loss_recovered, kl_div).",
    )
    evaluation_summary: str | None = Field(
        default=None, description="The same figures as one line, as `sae info` prints them."
    )
    evaluation_source: str | None = Field(
        default=None, description="Where the held-out tokens came from, as `sae train` saved it."
    )


class DictionaryListResponse(BaseModel):
    dictionaries: list[DictionaryInfo]


# -- features -----------------------------------------------------------------------------------
class FeatureStats(BaseModel):
    max_activation: float | None = Field(description="Largest activation seen in analysis.")
    mean_activation: float | None = Field(
        default=None, description="Mean activation over tokens where the feature fires."
    )
    frequency: float | None = Field(
        default=None, description="Fraction of analysed tokens where the feature fires."
    )
    count: int | None = Field(
        default=None, description="Number of analysed tokens where the feature fires."
    )


class Histogram(BaseModel):
    bin_edges: list[float] = Field(description="len(counts)+1 edges of the activation bins.")
    counts: list[int] = Field(description="Tokens per bin, over tokens where the feature fires.")


class TokenEffect(BaseModel):
    token_id: int
    token: str
    value: float = Field(description="Direct effect on this token's logit per unit of activation.")


class LogitEffects(BaseModel):
    positive: list[TokenEffect] = Field(
        description="Tokens the feature's decoder direction promotes most."
    )
    negative: list[TokenEffect] = Field(description="Tokens it suppresses most.")


class Label(BaseModel):
    text: str
    author: str | None = None
    created_at: str | None = Field(
        default=None, description="ISO-8601 UTC time the label was written."
    )


class ActivationExample(BaseModel):
    tokens: list[str] = Field(description="Context tokens around the activation.")
    values: list[float] = Field(description="The feature's activation on each token.")
    max_value: float = Field(description="The example's largest activation.")
    max_index: int = Field(description="Position (into tokens) of the largest activation.")


class ExamplePage(BaseModel):
    items: list[ActivationExample]
    offset: int
    limit: int
    total: int = Field(description="Number of stored examples.")


class FeatureResponse(BaseModel):
    address: str = Field(description="`DICTIONARY/FEATURE_ID`.")
    dictionary: str
    feature_id: int
    label: str | None = Field(description="Latest label text, if any.")
    labels: list[Label] = Field(description="All labels, oldest first.")
    stats: FeatureStats | None = Field(
        description="Statistics from analysis; null without analysis."
    )
    histogram: Histogram | None = Field(description="Activation histogram; null without analysis.")
    logit_effects: LogitEffects
    top_examples: ExamplePage


class FeatureSummary(BaseModel):
    address: str
    dictionary: str
    feature_id: int
    label: str | None = None
    max_activation: float | None = None
    frequency: float | None = None
    score: float | None = Field(
        default=None, description="Search score (higher is better), for searches."
    )


class FeaturePage(BaseModel):
    items: list[FeatureSummary]
    offset: int
    limit: int
    total: int


class BatchFeaturesRequest(_Body):
    features: list[FeatureAddress] = Field(min_length=1, description="Features to read.")
    examples_limit: int = Field(default=5, ge=0, description="Top examples per feature.")


class BatchFeaturesResponse(BaseModel):
    features: list[FeatureResponse]


class LabelRequest(_Body):
    text: str = Field(
        min_length=1, max_length=500, description="The label, e.g. `Python import lines`."
    )
    author: str | None = Field(
        default=None, max_length=100, description="Who wrote it (person or auto-interp run)."
    )


# -- text ---------------------------------------------------------------------------------------
class ActivationsRequest(_Body):
    text: Text
    features: list[FeatureAddress] = Field(min_length=1, description="Features to read.")


class FeatureTrace(BaseModel):
    address: str
    values: list[float] = Field(description="Activation on each token (same order as `tokens`).")
    max_value: float


class ActivationsResponse(BaseModel):
    tokens: list[str] = Field(
        description="Tokens of the text as the model sees them (BOS first if prepended)."
    )
    token_ids: list[int]
    features: list[FeatureTrace]


class TopFeaturesRequest(_Body):
    text: Text
    dictionary: str = Field(min_length=1, max_length=200, description="Served dictionary name.")
    k: int = Field(default=5, ge=1, le=100, description="Features kept per token.")
    limit: int = Field(default=20, ge=1, description="Features kept overall.")


class TokenFeature(BaseModel):
    feature_id: int
    value: float


class OverallFeature(BaseModel):
    address: str
    feature_id: int
    max_value: float = Field(description="Largest activation over the text's tokens.")
    sum_value: float = Field(description="Sum of activations over the text's tokens.")
    count: int = Field(description="Tokens where the feature fires.")
    label: str | None = None


class TopFeaturesResponse(BaseModel):
    dictionary: str
    tokens: list[str]
    token_ids: list[int]
    per_token: list[list[TokenFeature]] = Field(
        description="For each token, its top-k active features, largest first."
    )
    overall: list[OverallFeature] = Field(
        description="Features ranked by max activation over the text."
    )


# -- steering -----------------------------------------------------------------------------------
class Intervention(_Body):
    feature: FeatureAddress
    mode: Literal["add", "clamp"] = Field(
        default="add",
        description="`add`: x += strength · unit · W_dec[i]. `clamp`: set the feature's activation "
        "to `strength` (raw units) keeping the reconstruction error: x += (strength - f_i(x)) · W_dec[i].",
    )
    strength: float = Field(
        ge=-1e4,
        le=1e4,
        description="For add, multiples of the feature's max activation from analysis (see response "
        "`unit_source`); for clamp, the activation value.",
    )


class SteerRequest(_Body):
    prompt: Text
    interventions: list[Intervention] = Field(min_length=1)
    max_new_tokens: int = Field(default=16, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(default=0.0, ge=0.0, le=10.0, description="0 = greedy decoding.")
    top_k: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Sample only from the k likeliest tokens."
    )
    seed: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="Sampling seed, the same for baseline and steered.",
    )


UnitSource = Literal["analysis_max_activation", "prompt_norm", "raw"]


class AppliedIntervention(BaseModel):
    address: str
    mode: Literal["add", "clamp"]
    strength: float
    unit: float | None = Field(description="Activation units per strength unit (add only).")
    unit_source: UnitSource = Field(
        description="Where the unit came from: the feature's max activation in analysis, or, "
        "without analysis (or if the feature never fired in it), mean prompt-activation norm / ||W_dec[i]||; `raw` for clamp."
    )


class Completion(BaseModel):
    text: str = Field(description="The generated continuation only.")
    tokens: list[str]
    token_ids: list[int]


class SteerResponse(BaseModel):
    prompt_tokens: list[str]
    baseline: Completion
    steered: Completion
    interventions: list[AppliedIntervention]
    seed: int


# -- health -------------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    dictionaries: int
    models: list[str]
    queue: int = Field(description="Model jobs waiting or running now.")
