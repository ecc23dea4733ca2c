"""Requests that run the model on posted text: activations, top features, steering."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import StateDep, model_quota, require_read, require_write
from server.model_process import run_model_job
from server.schemas import (
    ActivationsRequest,
    ActivationsResponse,
    SteerRequest,
    SteerResponse,
    TopFeaturesRequest,
    TopFeaturesResponse,
)

router = APIRouter(prefix="/api", tags=["text"])


@router.post(
    "/activations",
    response_model=ActivationsResponse,
    summary="Activations of one or many features on every token of a text",
    dependencies=[Depends(require_read), Depends(model_quota)],
)
async def activations(state: StateDep, req: ActivationsRequest) -> ActivationsResponse:
    return await run_model_job(state, "activations", req)


@router.post(
    "/top-features",
    response_model=TopFeaturesResponse,
    summary="The strongest features of a text, per token and overall",
    dependencies=[Depends(require_read), Depends(model_quota)],
)
async def top_features(state: StateDep, req: TopFeaturesRequest) -> TopFeaturesResponse:
    return await run_model_job(state, "top_features", req)


@router.post(
    "/steer",
    response_model=SteerResponse,
    summary="Generate with features steered, beside the baseline (needs the API key)",
    dependencies=[Depends(require_write), Depends(model_quota)],
)
async def steer(state: StateDep, req: SteerRequest) -> SteerResponse:
    return await run_model_job(state, "steer", req)
