"""Liveness and readiness probes (no auth: orchestrators call them)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import ApiError
from server.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="The process is up")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, summary="Models and dictionaries are loaded")
async def readyz(request: Request) -> ReadyResponse:
    state = getattr(request.app.state, "sae", None)
    if state is None:
        raise ApiError(
            503, "not_ready", "the service is still loading", headers={"Retry-After": "5"}
        )
    return ReadyResponse(
        status="ready",
        dictionaries=len(state.dictionaries),
        models=sorted(state.models),
        queue=state.pending,
    )
