"""Feature pages, lists, batch reads, search, labels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Response, status
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from server import features as svc
from server.deps import DictionaryDep, ServedDictionary, StateDep, require_read, require_write
from server.errors import not_found
from server.limits import check_body, page_size
from server.schemas import (
    BatchFeaturesRequest,
    BatchFeaturesResponse,
    FeaturePage,
    FeatureResponse,
    Label,
    LabelRequest,
)

router = APIRouter(prefix="/api", tags=["features"])
T = TypeVar("T")

FeatureId = Annotated[int, Path(ge=0, le=10**9, description="Index into the dictionary.")]
Offset = Annotated[int, Query(ge=0, le=10**9, description="Items to skip.")]
Limit = Annotated[
    int | None,
    Query(ge=0, description="Items to return (default: a page, at most the server's max_page)."),
]


def _page(state: StateDep, limit: int | None, default: int) -> int:
    return page_size(state.settings, limit, default)


def _json(body: BaseModel) -> Any:
    """The response as JSON straight from pydantic: the model was built by our own code, so
    FastAPI's validating its `response_model` again would only double the cost of a read."""
    return Response(body.model_dump_json(), media_type="application/json")


async def _read(sd: ServedDictionary, fn: Callable[..., T], *args: Any) -> T:
    """A read of the feature store runs right here on the event loop: SQLite and memory-
    mapped arrays take a millisecond, less than a hop to the threadpool and the wait for the
    GIL there. A dictionary without analysis computes with torch instead: on the threadpool."""
    if sd.has_analysis():
        return fn(*args)
    return await run_in_threadpool(fn, *args)


def _feature_id(sd: ServedDictionary, feature_id: int) -> int:
    if feature_id >= sd.d_sae:
        raise not_found(f"feature {sd.name}/{feature_id} (d_sae is {sd.d_sae})")
    return feature_id


@router.get(
    "/features/{dictionary}",
    response_model=FeaturePage,
    summary="A page of a dictionary's features",
    dependencies=[Depends(require_read)],
)
async def list_features(
    state: StateDep,
    sd: DictionaryDep,
    offset: Offset = 0,
    limit: Limit = None,
    order_by: svc.OrderBy = "feature_id",
    descending: bool = False,
) -> FeaturePage:
    return _json(svc.list_features(sd, offset, _page(state, limit, 50), order_by, descending))


@router.get(
    "/features/{dictionary}/{feature_id}",
    response_model=FeatureResponse,
    summary="One feature: statistics, histogram, logit effects, labels, top examples",
    dependencies=[Depends(require_read)],
)
async def get_feature(
    state: StateDep,
    sd: DictionaryDep,
    feature_id: FeatureId,
    offset: Offset = 0,
    limit: Limit = None,
) -> FeatureResponse:
    fid = _feature_id(sd, feature_id)
    page = _page(state, limit, 10)
    return _json(await _read(sd, svc.feature_response, state, sd, fid, offset, page))


@router.post(
    "/features/batch",
    response_model=BatchFeaturesResponse,
    summary="Several features by address, in request order",
    dependencies=[Depends(require_read)],
)
async def batch_features(state: StateDep, req: BatchFeaturesRequest) -> BatchFeaturesResponse:
    check_body(state.settings, req)
    resolved = [state.resolve(address) for address in req.features]

    def read() -> BatchFeaturesResponse:
        return BatchFeaturesResponse(
            features=[
                svc.feature_response(state, sd, fid, 0, req.examples_limit) for sd, fid in resolved
            ]
        )

    if all(sd.has_analysis() for sd, _ in resolved):
        return _json(read())
    return _json(await run_in_threadpool(read))


@router.get(
    "/search",
    response_model=FeaturePage,
    summary="Search a dictionary's features by text (labels, tokens) or by promoted token",
    dependencies=[Depends(require_read)],
)
def search(
    state: StateDep,
    dictionary: Annotated[
        str, Query(min_length=1, max_length=200, description="Served dictionary name.")
    ],
    q: Annotated[
        str, Query(min_length=1, max_length=500, description="Words, or one token for by=token.")
    ],
    by: Annotated[
        Literal["text", "token"],
        Query(
            description="`text`: labels, top-activating and promoted tokens (needs analysis); "
            "`token`: features whose decoder direction most raises this token's logit."
        ),
    ] = "text",
    offset: Offset = 0,
    limit: Limit = None,
) -> FeaturePage:
    return svc.search_features(state, state.get(dictionary), q, by, offset, _page(state, limit, 20))


@router.post(
    "/features/{dictionary}/{feature_id}/labels",
    response_model=Label,
    status_code=status.HTTP_201_CREATED,
    summary="Write a label (needs the API key)",
    dependencies=[Depends(require_write)],
)
def add_label(sd: DictionaryDep, feature_id: FeatureId, req: LabelRequest) -> Label:
    fid = _feature_id(sd, feature_id)
    rec = sd.writable_store().add_label(fid, req.text, req.author or "anonymous")
    return Label(text=rec.text, author=rec.author, created_at=rec.created_at)
