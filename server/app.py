"""The FastAPI app: `create_app(settings)` for `sae serve`, `create_app(state=...)` for tests.

Models, dictionaries and feature stores are loaded once in the lifespan (in a worker thread,
so the loop stays responsive) and handed to handlers as `AppState` through typed dependencies
(server/deps.py). OpenAPI at /docs; the web feature browser at /.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.deps import AppState, load_state
from server.errors import error_response, install_error_handlers
from server.limits import document_limits
from server.routers import dictionaries, features, health, text
from server.schemas import ErrorBody
from server.security import PAGE_HEADERS, HostCheck, trusted_hosts
from server.settings import ServerSettings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"


class BodyLimit:
    """413 for a request body over `max_bytes`, whether it declares its length or streams.

    The body is read here (it is small by construction) and replayed to the app, so an
    oversized chunked upload is refused before any handler or JSON parser sees it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = error_response(
            413, "payload_too_large", f"request body is over {self.max_bytes} bytes"
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await too_large(scope, receive, send)
                    return
            except ValueError:
                pass  # the server rejects a malformed length itself
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnect: nothing to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(settings: ServerSettings | None = None, state: AppState | None = None) -> FastAPI:
    """The app. With `state`, serve it as is (tests); else load `settings` in the lifespan."""
    if state is None and settings is None:
        raise ValueError("create_app needs settings or a loaded state")
    settings = state.settings if state is not None else settings
    assert settings is not None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = state is None  # a state handed in belongs to the caller, who closes it
        app.state.sae = (
            state if state is not None else await run_in_threadpool(load_state, settings)
        )
        log.info("ready: %d dictionaries", len(app.state.sae.dictionaries))
        try:
            yield
        finally:
            if owned:
                app.state.sae.close()
            app.state.sae = None

    app = FastAPI(
        title="SAE feature dictionaries",
        summary="Read features, run text through model + dictionary, steer generation.",
        version="1",
        lifespan=lifespan,
        responses={
            "4XX": {"model": ErrorBody, "description": "Any client error (one body shape)."},
            "5XX": {"model": ErrorBody, "description": "Busy, not ready, or a bug (logged)."},
        },
    )
    install_error_handlers(app)
    generate_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # generated once, then cached by FastAPI
            document_limits(generate_openapi(), settings)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    for r in (health.router, dictionaries.router, features.router, text.router):
        app.include_router(r)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # Added last, so outermost: an untrusted Host is refused before anything else runs.
    app.add_middleware(HostCheck, hosts=trusted_hosts(settings.host, settings.allowed_hosts))
    return app
