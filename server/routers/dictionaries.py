"""The served dictionaries."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.deps import DictionaryDep, StateDep, require_read
from server.schemas import DictionaryInfo, DictionaryListResponse

router = APIRouter(
    prefix="/api/dictionaries", tags=["dictionaries"], dependencies=[Depends(require_read)]
)


@router.get("", response_model=DictionaryListResponse, summary="List served dictionaries")
async def list_dictionaries(state: StateDep) -> DictionaryListResponse:
    return DictionaryListResponse(dictionaries=[sd.info() for sd in state.dictionaries.values()])


@router.get("/{dictionary}", response_model=DictionaryInfo, summary="One dictionary")
async def get_dictionary(sd: DictionaryDep) -> DictionaryInfo:
    return sd.info()
