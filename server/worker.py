"""The model worker: one thread owns every forward pass, and concurrent requests for hook
activations are batched into one pass.

Why one thread: steering installs its hooks on the model object for the length of a
generation, so two forward passes must never overlap (and on a CPU torch already spreads one
pass over every core; on a GPU it bounds memory). Why batching: while a pass runs, requests
queue up; the next pass serves all of them that read the same model and hook, right-padded
into one [B, T_max] batch. Right padding is exact for a causal model: real tokens only attend
to earlier, real tokens, and positions start at 0 in every row.

Back-pressure: `admit()` counts requests on the event loop and refuses more than
`max_waiting` with `Busy` (503 + Retry-After), so a burst cannot queue unbounded work.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from jaxtyping import Float, Int
from starlette.concurrency import run_in_threadpool
from torch import Tensor

from activations.hooks import hook_activations

T = TypeVar("T")


class Busy(Exception):
    """Too many model requests are waiting; the client should retry later."""


@contextlib.contextmanager
def admit_request(queue: Any) -> Iterator[None]:
    """Count a model request as pending while it runs; `Busy` past `queue.max_waiting`.
    (The `admit` method of both the model thread's and the model process's queue.)"""
    if queue.pending >= queue.max_waiting:
        raise Busy(f"{queue.pending} model requests are queued; retry shortly")
    queue.pending += 1
    try:
        yield
    finally:
        queue.pending -= 1


@dataclass
class _Job:
    future: Future[Any]
    fn: Callable[..., Any] | None = None
    """An exclusive job (steering): run alone."""
    args: tuple[Any, ...] = ()
    model: Any = None
    """A batchable job: activations of `ids` at `hook` of `model`."""
    hook: str = ""
    ids: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


class ModelQueue:
    """See the module docstring. `max_batch_tokens` bounds B x T_max of a batched pass."""

    def __init__(self, max_waiting: int, max_batch_tokens: int = 8192) -> None:
        self.max_waiting = max_waiting
        self.max_batch_tokens = max_batch_tokens
        self.pending = 0
        """Admitted requests not finished yet (touched only on the event loop)."""
        self.batches = 0
        self.batched_jobs = 0
        """Forward passes run for activation requests, and the requests they served."""
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    # -- the event-loop side ----------------------------------------------------------------
    admit = admit_request

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` alone on the worker thread (it may run forward passes itself)."""
        with self.admit():
            return await asyncio.wrap_future(self.submit(fn, *args))

    async def run_in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the threadpool; its forward passes go through `activations`."""
        with self.admit():
            return await run_in_threadpool(fn, *args)

    # -- any thread ---------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._put(_Job(Future(), fn=fn, args=args))

    def activations(self, model: Any, hook: str, ids: Int[Tensor, " T"]) -> Float[Tensor, "T D"]:
        """The activation at `hook` for each token of `ids`, computed in a (shared) batch."""
        if threading.current_thread() is self._thread:  # already on the worker: just run it
            return hook_activations(model, ids, hook)
        return self._put(_Job(Future(), model=model, hook=hook, ids=ids)).result()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _put(self, job: _Job) -> Future[Any]:
        with self._cv:
            if self._closed:
                raise RuntimeError("the model worker is closed")
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    # -- the worker thread ------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        """The next exclusive job, or every queued activation job batchable with the first."""
        with self._cv:
            while not self._jobs and not self._closed:
                self._cv.wait()
            if not self._jobs:
                return None
            first = self._jobs.popleft()
            if first.fn is not None:
                return [first]
            batch, rest = [first], collections.deque[_Job]()
            longest = len(first.ids)
            while self._jobs:
                job = self._jobs.popleft()
                fits = max(longest, len(job.ids)) * (len(batch) + 1) <= self.max_batch_tokens
                if job.fn is None and job.model is first.model and job.hook == first.hook and fits:
                    batch.append(job)
                    longest = max(longest, len(job.ids))
                else:
                    rest.append(job)
            self._jobs.extendleft(reversed(rest))
            return batch

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            try:
                if jobs[0].fn is not None:
                    result: Any = jobs[0].fn(*jobs[0].args)
                    jobs[0].future.set_result(result)
                    continue
                lengths = [len(j.ids) for j in jobs]
                tokens = torch.zeros(len(jobs), max(lengths), dtype=torch.long)
                for row, job in enumerate(jobs):
                    tokens[row, : lengths[row]] = job.ids
                    tokens[row, lengths[row] :] = job.ids[-1]  # right padding: never attended
                acts = hook_activations(jobs[0].model, tokens, jobs[0].hook)
                self.batches += 1
                self.batched_jobs += len(jobs)
                for row, job in enumerate(jobs):
                    job.future.set_result(acts[row, : lengths[row]].clone())
            except Exception as e:  # the caller gets the error; the worker lives on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
