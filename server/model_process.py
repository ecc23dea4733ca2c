"""The model in its own process: text activations, top features and steering run in a child
process, so feature reads in the server process never wait behind a forward pass.

Why a process and not the worker thread alone: a forward pass holds the GIL between torch
calls and torch's threads take every core, so on a small machine a thread in the server
process starves the event loop and the threadpool that serve feature reads (SQLite and
memory-mapped arrays, which stay here). The child runs at a lower scheduling priority
(`NICENESS`), so when both want the CPU the reads win, and the model gets every idle cycle.

Inside the child nothing changes: the same service functions (server/service.py) run on a
pool of `max_queue` threads, and their forward passes go through the same batching
`ModelQueue` (server/worker.py), so concurrent activation requests still share one padded
pass and steering still runs alone. Requests and responses cross a pipe as JSON-ready dicts
and JSON bytes; errors cross as the exception the handler would have raised, so a client
sees the same status and body either way. `worker_process=False` keeps the model on a
thread of the server process (the reference path; tests compare the two).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import itertools
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Response
from pydantic import BaseModel

from sae.errors import UserError
from server.errors import ApiError
from server.inference import LimitExceeded
from server.worker import admit_request

if TYPE_CHECKING:
    from server.deps import AppState
    from server.settings import ServerSettings

log = logging.getLogger(__name__)

Kind = Literal["activations", "top_features", "steer"]
NICENESS = 5
"""How much lower the child's CPU priority is than the server's (see the module docstring)."""
START_TIMEOUT_S = 600.0
IDLE_S = 2.0
"""Seconds without a request after which the child returns its free memory."""


def _jobs() -> dict[str, tuple[type[BaseModel], Callable[..., BaseModel], bool]]:
    """kind -> (request schema, service function, runs alone on the worker thread)."""
    from server import service
    from server.schemas import ActivationsRequest, SteerRequest, TopFeaturesRequest

    return {
        "activations": (ActivationsRequest, service.activations, False),
        "top_features": (TopFeaturesRequest, service.top_features, False),
        "steer": (SteerRequest, service.steer, True),
    }


# -- the child ------------------------------------------------------------------------------------


def _answer(state: AppState, kind: str, body: dict[str, Any]) -> tuple[str, Any]:
    schema, fn, alone = _jobs()[kind]
    try:
        req = schema.model_validate(body)
        if alone:
            resp = state.queue.submit(fn, state, req).result()
        else:
            resp = fn(state, req)
        return "ok", resp.model_dump_json().encode()
    except ApiError as e:
        return "api_error", (e.status, e.code, e.message, e.detail, e.headers)
    except LimitExceeded as e:
        return "limit", str(e)
    except UserError as e:
        return "user_error", str(e)
    except Exception:
        log.exception("model job %s failed", kind)
        return "bug", f"model job {kind} failed (logged by the model process)"


def _child(settings: ServerSettings, conn: Connection) -> None:
    """The child's main: load, say ready (or why not), then answer jobs until the pipe closes."""
    from server.deps import load_state

    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(message)s")
    # Ctrl-C in a terminal reaches the whole process group; the server ends this process by
    # closing the pipe, after its own shutdown, instead of a traceback from here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    try:
        state = load_state(dataclasses.replace(settings, worker_process=False))
    except UserError as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ready", os.getpid()))
    send_lock = threading.Lock()

    def run(job_id: int, kind: str, body: dict[str, Any]) -> None:
        outcome = _answer(state, kind, body)
        with send_lock:
            conn.send((job_id, *outcome))

    in_flight: list[Future[None]] = []
    worked = False  # since memory was last returned
    with ThreadPoolExecutor(settings.max_queue, thread_name_prefix="model-job") as pool:
        while True:
            try:
                if not conn.poll(IDLE_S):
                    if worked and all(f.done() for f in in_flight):  # once per idle spell
                        worked = False
                        _return_free_memory()
                    continue
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg is None:
                break
            in_flight = [f for f in in_flight if not f.done()]
            in_flight.append(pool.submit(run, *msg))
            worked = True
    state.close()


def _return_free_memory() -> None:
    """Give the pages glibc keeps after a burst of requests back to the system, so the
    process shrinks to its resting size when the load is over (no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# -- the server side ------------------------------------------------------------------------------


class ModelProcess:
    """The child process and the server's end of its pipe. Start it, then `wait_ready()`."""

    def __init__(self, settings: ServerSettings) -> None:
        self.max_waiting = settings.max_queue
        self.pending = 0
        """Admitted requests not answered yet (touched only on the event loop)."""
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs torch
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child, args=(settings, child_end), name="sae-model", daemon=True
        )
        self._proc.start()
        child_end.close()
        self._ids = itertools.count()
        self._futures: dict[int, Future[tuple[str, Any]]] = {}
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def wait_ready(self) -> None:
        """Block until the child has loaded; UserError with its reason if it could not."""
        if not self._conn.poll(START_TIMEOUT_S):
            self.close()
            raise UserError(f"the model process did not start in {START_TIMEOUT_S:.0f} s")
        try:
            status, detail = self._conn.recv()
        except EOFError:
            self.close()
            raise UserError("the model process exited while loading (see its log)") from None
        if status != "ready":
            self.close()
            raise UserError(str(detail))
        self._reader = threading.Thread(target=self._read, name="model-replies", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                job_id, *outcome = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._futures.pop(job_id, None)
            if future is not None:
                future.set_result(tuple(outcome))  # type: ignore[arg-type]
        with self._lock:  # the child is gone: nobody will answer these
            futures, self._futures = list(self._futures.values()), {}
        for future in futures:
            future.set_result(("gone", None))

    admit = admit_request

    async def call(self, kind: Kind, req: BaseModel) -> Response:
        """The child's answer to one request, as the JSON response the handler would give."""
        with self.admit():
            future: Future[tuple[str, Any]] = Future()
            with self._lock:
                job_id = next(self._ids)
                self._futures[job_id] = future
                if self._reader is None or not self._reader.is_alive():
                    self._futures.pop(job_id)
                    raise ApiError(503, "unavailable", "the model process is not running")
                self._conn.send((job_id, kind, req.model_dump(mode="json")))
            status, payload = await asyncio.wrap_future(future)
        if status == "ok":
            return Response(payload, media_type="application/json")
        if status == "api_error":
            code, name, message, detail, headers = payload
            raise ApiError(code, name, message, detail, headers)
        if status == "limit":
            raise LimitExceeded(payload)
        if status == "user_error":
            raise UserError(payload)
        if status == "gone":
            raise ApiError(503, "unavailable", "the model process stopped; see the server log")
        raise RuntimeError(payload)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(None)
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=5)
        self._conn.close()


async def run_model_job(state: AppState, kind: Kind, req: BaseModel) -> Any:
    """Run a text request on the model process if there is one, else on this process's
    worker thread (steering) or threadpool with batched forward passes (the rest)."""
    if state.model_process is not None:
        return await state.model_process.call(kind, req)
    _schema, fn, alone = _jobs()[kind]
    if alone:
        return await state.queue.run(fn, state, req)
    return await state.queue.run_in_pool(fn, state, req)
