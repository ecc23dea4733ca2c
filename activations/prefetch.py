"""Run an iterator on a background thread, a few items ahead of its consumer.

Used to overlap tokenization with the model's forward pass (cache, stream) and batch gathering
with the trainer's step (reader). Torch ops and the Rust tokenizer release the GIL, so the two
threads really run at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")

JOIN_SECONDS = 30.0
"""How long closing the consumer waits for the producer to finish the item it is computing."""


def in_background(items: Iterator[T], depth: int) -> Iterator[T]:
    """Yield what `items` yields, computed up to `depth` items ahead on a daemon thread.

    Exceptions in the producer are re-raised in the consumer; closing the returned generator
    (or dropping it) stops the producer at its next item and waits for it to get there.
    """
    q: queue.Queue[object] = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as e:
            put(e)

    thread = threading.Thread(target=run, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        # Wait for the producer to leave its current item: a daemon thread still inside a
        # torch op when the interpreter exits aborts the process.
        thread.join(timeout=JOIN_SECONDS)
