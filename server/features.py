"""Feature pages, lists and searches: feature-store records (or, for a dictionary with no
analysis, what the weights alone tell) turned into response schemas. Routers stay thin by
calling these; each function is synchronous and runs in FastAPI's threadpool."""

from __future__ import annotations

from typing import Any, Literal

from analysis import store as st
from analysis import store_records as records
from server.deps import AppState, ServedDictionary
from server.errors import ApiError
from server.inference import LimitExceeded, feature_logit_effects, token_scores, tokenize
from server.schemas import (
    ActivationExample,
    ExamplePage,
    FeaturePage,
    FeatureResponse,
    FeatureStats,
    FeatureSummary,
    Histogram,
    Label,
    LogitEffects,
    TokenEffect,
)

N_LOGIT_EFFECTS = 10


def _label(rec: records.Label) -> Label:
    return Label(text=rec.text, author=rec.author, created_at=rec.created_at)


def _example(ex: records.Example) -> ActivationExample:
    return ActivationExample(
        tokens=ex.tokens, values=ex.acts, max_value=ex.max_act, max_index=ex.max_index
    )


def _computed_logit_effects(state: AppState, sd: ServedDictionary, fid: int) -> LogitEffects:
    """Without analysis, the same logit effects the analysis pass would store."""
    model = state.model_for(sd)
    effects = feature_logit_effects(model, sd.dictionary, fid, N_LOGIT_EFFECTS)
    if effects is None:
        return LogitEffects(positive=[], negative=[])
    decode = model.tokenizer.decode

    def rows(values: Any, ids: Any) -> list[TokenEffect]:
        return [
            TokenEffect(token_id=int(i), token=decode([int(i)]), value=float(v))
            for v, i in zip(values[0].tolist(), ids[0].tolist(), strict=True)
        ]

    return LogitEffects(
        positive=rows(effects.promoted, effects.promoted_ids),
        negative=rows(effects.suppressed, effects.suppressed_ids),
    )


def feature_response(
    state: AppState, sd: ServedDictionary, fid: int, offset: int, limit: int
) -> FeatureResponse:
    """Everything known about one feature, with one page of its top examples."""
    store = sd.store
    stats: FeatureStats | None = None
    histogram: Histogram | None = None
    if store is not None and store.has_statistics():
        rec = store.feature(fid)
        labels = [_label(lab) for lab in rec.labels]
        stats = FeatureStats(
            max_activation=rec.max_act,
            mean_activation=rec.mean_act,
            frequency=rec.density,
            count=rec.n_fires,
        )
        histogram = Histogram(bin_edges=rec.histogram.edges, counts=rec.histogram.counts)
        effects = LogitEffects(
            positive=[
                TokenEffect(token_id=e.token_id, token=e.token, value=e.value) for e in rec.promoted
            ],
            negative=[
                TokenEffect(token_id=e.token_id, token=e.token, value=e.value)
                for e in rec.suppressed
            ],
        )
        page = ExamplePage(
            items=[_example(e) for e in store.top_examples(fid, offset, limit)],
            offset=offset,
            limit=limit,
            total=store.example_count(fid),
        )
    else:
        labels = [_label(lab) for lab in store.labels(fid)] if store is not None else []
        effects = _computed_logit_effects(state, sd, fid)
        page = ExamplePage(items=[], offset=offset, limit=limit, total=0)
    return FeatureResponse(
        address=f"{sd.name}/{fid}",
        dictionary=sd.name,
        feature_id=fid,
        label=labels[-1].text if labels else None,
        labels=labels,
        stats=stats,
        histogram=histogram,
        logit_effects=effects,
        top_examples=page,
    )


def _summary(
    sd: ServedDictionary, s: records.FeatureSummary, score: float | None = None
) -> FeatureSummary:
    return FeatureSummary(
        address=f"{sd.name}/{s.feature_id}",
        dictionary=sd.name,
        feature_id=s.feature_id,
        label=s.label,
        max_activation=s.max_act,
        frequency=s.density,
        score=score,
    )


def _bare_summaries(
    sd: ServedDictionary, ids: list[int], scores: list[float] | None = None
) -> list[FeatureSummary]:
    """Summaries with no statistics (no analysis), labels from the store if one exists."""
    out = []
    for j, fid in enumerate(ids):
        labels = sd.store.labels(fid) if sd.store is not None else []
        out.append(
            FeatureSummary(
                address=f"{sd.name}/{fid}",
                dictionary=sd.name,
                feature_id=fid,
                label=labels[-1].text if labels else None,
                score=None if scores is None else scores[j],
            )
        )
    return out


OrderBy = Literal["feature_id", "frequency", "max_activation", "mean_activation"]
_STORE_ORDER: dict[str, st.OrderBy] = {
    "feature_id": "feature_id",
    "frequency": "density",
    "max_activation": "max_act",
    "mean_activation": "mean_act",
}


def list_features(
    sd: ServedDictionary, offset: int, limit: int, order_by: OrderBy, descending: bool
) -> FeaturePage:
    if sd.has_analysis():
        assert sd.store is not None
        rows = sd.store.features(offset, limit, _STORE_ORDER[order_by], descending)
        items = [_summary(sd, s) for s in rows]
    else:
        if order_by != "feature_id":
            raise ApiError(
                409, "no_analysis", f"dictionary {sd.name!r} has no analysis to order by {order_by}"
            )
        ids = range(sd.d_sae)
        ids = ids[::-1] if descending else ids
        items = _bare_summaries(sd, list(ids[offset : offset + limit]))
    return FeaturePage(items=items, offset=offset, limit=limit, total=sd.d_sae)


def search_features(
    state: AppState,
    sd: ServedDictionary,
    q: str,
    by: Literal["text", "token"],
    offset: int,
    limit: int,
) -> FeaturePage:
    """`text`: full-text search of labels, top-activating and promoted tokens (needs
    analysis). `token`: features whose decoder direction most raises that token's logit."""
    if by == "text":
        if not sd.has_analysis():
            raise ApiError(
                409,
                "no_analysis",
                f"dictionary {sd.name!r} has no analysis to search; run `sae analyze`",
            )
        assert sd.store is not None
        rows = sd.store.search(q, limit=limit, offset=offset)
        items = [_summary(sd, s) for s in rows]
        return FeaturePage(items=items, offset=offset, limit=limit, total=sd.store.search_total(q))
    model = state.model_for(sd)
    try:
        ids = tokenize(model, q, max_tokens=2, prepend_bos=False)
    except LimitExceeded:
        ids = None
    if ids is None or ids.numel() != 1:
        raise ApiError(422, "validation_error", f"{q!r} is not one token of the model's vocabulary")
    scores = token_scores(model, sd.dictionary, int(ids[0]))
    if scores is None:
        raise ApiError(
            409,
            "no_direct_path",
            f"hook {sd.dictionary.cfg.hook_name} has no direct path to the logits",
        )
    order = scores.argsort(descending=True)[offset : offset + limit].tolist()
    if sd.has_analysis():
        assert sd.store is not None
        items = [_summary(sd, s, float(scores[s.feature_id])) for s in sd.store.summaries(order)]
    else:
        items = _bare_summaries(sd, order, [float(scores[i]) for i in order])
    return FeaturePage(items=items, offset=offset, limit=limit, total=sd.d_sae)
