"""Run an iterator in a background thread, a few items ahead of its consumer.

The loader reads, validates and formats a partition's records in Python while the warehouse
connection sends the previous chunk: psycopg2 releases the GIL while it waits on the server, so
the two overlap and a load uses both the loader's core and the database's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()
_POLL_SECONDS = 0.1


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(items: Iterable[T], depth: int = 2, name: str = "prefetch") -> Iterator[T]:
    """Yield ``items`` as produced by a background thread that runs at most ``depth`` ahead.

    An exception raised while producing is raised here, unchanged, at its place in the
    sequence. When the consumer stops early (an error, or ``close()``), the producer stops at
    its next item and the source is closed in its own thread before this generator returns.
    """
    handoff: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=_POLL_SECONDS)
            except queue.Full:
                continue
            return True
        return False

    def produce() -> None:
        source = iter(items)
        try:
            for item in source:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as error:  # handed to the consumer, which raises it
            offer(_Failed(error))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while True:
            item = handoff.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        producer.join()
