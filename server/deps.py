"""What the app loads once (models, dictionaries, feature stores) and the typed dependencies
handlers receive it through. Nothing here is a module-level singleton: `AppState` lives on
`app.state` from the lifespan, so a test can build an app around any state it likes."""

from __future__ import annotations

import collections
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request
from fastapi import Path as PathParam

from analysis.store import DB_NAME, FeatureStore, resolve_store_dir
from sae.base import Dictionary
from sae.errors import UserError
from sae.evaluation import heldout_figures, summary_line
from server.errors import ApiError, not_found
from server.schemas import ADDRESS_RE, DictionaryInfo
from server.settings import ServerSettings, spec_name, spec_path
from server.worker import ModelQueue

if TYPE_CHECKING:
    from server.model_process import ModelProcess

log = logging.getLogger(__name__)


@dataclass
class ServedDictionary:
    """One dictionary as served: its weights, its model, and its feature store if analysed."""

    name: str
    path: Path
    dictionary: Dictionary
    model_key: str
    """Key into `AppState.models`."""
    store: FeatureStore | None = None
    """Opened at start-up if an analysis exists; created on the first label write otherwise."""
    _store_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def d_sae(self) -> int:
        return self.dictionary.d_sae

    def has_analysis(self) -> bool:
        return self.store is not None and self.store.has_statistics()

    def writable_store(self) -> FeatureStore:
        """The feature store, creating an empty one (labels only) next to the dictionary."""
        with self._store_lock:
            if self.store is None:
                self.store = FeatureStore.open(self.path)
            return self.store

    def info(self) -> DictionaryInfo:
        cfg = self.dictionary.cfg
        analysis = None
        if self.has_analysis():
            assert self.store is not None
            m = self.store.meta()
            analysis = {
                "n_tokens": m.n_tokens,
                "n_top": m.n_top,
                "model_name": m.model_name,
                "created_at": m.created_at,
                "generation": m.generation,
            }
        figures = heldout_figures(cfg.provenance)
        return DictionaryInfo(
            name=self.name,
            architecture=cfg.architecture,
            d_in=cfg.d_in,
            d_sae=cfg.d_sae,
            hook_name=cfg.hook_name,
            model_name=cfg.model_name,
            has_analysis=analysis is not None,
            analysis=analysis,
            evaluation=figures or None,
            evaluation_summary=summary_line(figures) if figures else None,
            evaluation_source=cfg.provenance.get("eval_source") if figures else None,
        )


class RateLimiter:
    """Sliding one-minute window of request times per client address."""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float | None:
        """None if `client` may go ahead (and count it), else seconds until it may."""
        now = time.monotonic()
        with self._lock:
            times = self._seen.setdefault(client, collections.deque())
            while times and times[0] <= now - self.WINDOW_S:
                times.popleft()
            if len(times) >= self.per_minute:
                return times[0] + self.WINDOW_S - now
            times.append(now)
            if len(self._seen) > 10_000:  # forget idle clients so memory stays bounded
                for key in [k for k, v in self._seen.items() if not v]:
                    del self._seen[key]
            return None


@dataclass
class AppState:
    settings: ServerSettings
    dictionaries: dict[str, ServedDictionary]
    models: dict[str, Any]
    """Loaded language models (TransformerBridge), by model name."""
    queue: ModelQueue
    limiter: RateLimiter | None = None
    """Per-client quota on model requests; None when `rate_limit` is 0."""
    model_process: ModelProcess | None = None
    """Where text requests run when `worker_process` is on; None: on `queue` here."""

    @property
    def pending(self) -> int:
        """Model requests admitted and not answered yet."""
        return (self.model_process or self.queue).pending

    def close(self) -> None:
        if self.model_process is not None:
            self.model_process.close()
        self.queue.close()
        for sd in self.dictionaries.values():
            if sd.store is not None:
                sd.store.close()

    def model_for(self, sd: ServedDictionary) -> Any:
        return self.models[sd.model_key]

    def get(self, name: str) -> ServedDictionary:
        sd = self.dictionaries.get(name)
        if sd is None:
            raise not_found(f"dictionary {name!r}")
        return sd

    def resolve(self, address: str) -> tuple[ServedDictionary, int]:
        """`DICTIONARY/FEATURE_ID` -> (dictionary, id); 404 for an unknown one."""
        m = ADDRESS_RE.match(address)
        if m is None:
            raise ApiError(422, "validation_error", f"bad feature address {address!r}")
        sd = self.get(m.group(1))
        fid = int(m.group(2))
        if fid >= sd.d_sae:
            raise not_found(f"feature {address!r} (d_sae is {sd.d_sae})")
        return sd, fid


def load_state(settings: ServerSettings) -> AppState:
    """Load every dictionary, its store and the models they need, and start the model
    process if `worker_process` is on (it loads its own copy meanwhile). Slow; run it once."""
    if not settings.dictionaries:
        raise UserError("no dictionary to serve; pass at least one dictionary directory")
    if not settings.worker_process:
        return _load(settings, None)
    from server.model_process import ModelProcess

    process = ModelProcess(settings)
    try:
        state = _load(settings, process)
        process.wait_ready()
    except BaseException:
        process.close()
        raise
    return state


def _load(settings: ServerSettings, process: ModelProcess | None) -> AppState:
    from activations.model import load_model
    from sae.io import load_dictionary

    served: dict[str, ServedDictionary] = {}
    models: dict[str, Any] = {}
    for spec in settings.dictionaries:
        name, path = spec_name(spec), Path(spec_path(spec)).expanduser()
        d = load_dictionary(path, device=settings.device).eval().requires_grad_(False)
        model_name = settings.model or d.cfg.model_name
        if model_name is None:
            raise UserError(f"{path}: cfg.json names no model_name; pass --model")
        if d.cfg.hook_name is None:
            raise UserError(f"{path}: cfg.json names no hook_name")
        if model_name not in models:
            models[model_name] = (
                load_model(model_name, device=settings.device).eval().requires_grad_(False)
            )
        store = None
        if (resolve_store_dir(path) / DB_NAME).is_file():
            store = FeatureStore.open(path)
        served[name] = ServedDictionary(name, path, d, model_name, store)
        log.info(
            "serving %s: %s d_sae=%d at %s (%s)",
            name,
            d.cfg.architecture,
            d.d_sae,
            d.cfg.hook_name,
            "analysed" if served[name].has_analysis() else "no analysis",
        )
    limiter = RateLimiter(settings.rate_limit) if settings.rate_limit else None
    return AppState(settings, served, models, ModelQueue(settings.max_queue), limiter, process)


# -- dependencies ---------------------------------------------------------------------------------
# `async def` although none awaits: FastAPI runs a plain `def` dependency on its threadpool,
# and a hop to a thread and back for each of them would cost a feature read more than the
# read itself.


async def get_state(request: Request) -> AppState:
    state: AppState | None = getattr(request.app.state, "sae", None)
    if state is None:
        raise ApiError(
            503, "not_ready", "the service is still loading", headers={"Retry-After": "5"}
        )
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def _given_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key")


def _check_key(request: Request, expected: str) -> None:
    given = _given_key(request)
    if given is None:
        raise ApiError(
            401,
            "unauthorized",
            "an API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )


async def require_read(request: Request, state: StateDep) -> None:
    """Reads are public unless `public_reads` is off; then they need the key."""
    if state.settings.public_reads:
        return
    if state.settings.api_key is None:  # validated against at start-up; belt and braces
        raise ApiError(403, "forbidden", "reads are private and no API key is configured")
    _check_key(request, state.settings.api_key)


async def require_write(request: Request, state: StateDep) -> None:
    """Writes and steering always need the key; with none configured they are disabled."""
    if state.settings.api_key is None:
        raise ApiError(
            403,
            "forbidden",
            "writes and steering are disabled: start the server with an API key "
            "(--api-key or SAE_SERVE_API_KEY)",
        )
    _check_key(request, state.settings.api_key)


async def model_quota(request: Request, state: StateDep) -> None:
    """429 once a client has used its `rate_limit` model requests in the last minute."""
    if state.limiter is None:
        return
    client = request.client.host if request.client else "unknown"
    wait = state.limiter.retry_after(client)
    if wait is not None:
        raise ApiError(
            429,
            "too_many_requests",
            f"more than {state.limiter.per_minute} model requests a minute from {client}",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


async def get_dictionary(
    state: StateDep,
    dictionary: Annotated[str, PathParam(description="Served dictionary name.", max_length=200)],
) -> ServedDictionary:
    return state.get(dictionary)


DictionaryDep = Annotated[ServedDictionary, Depends(get_dictionary)]
