"""Batches built and sent to the devices ahead of the step that uses them.

A background thread runs `make(k)` for the next few `k` (collating from the flat token
arrays and `device_put`, both of which release the GIL for most of their time) while the
main thread dispatches steps, so the device does not wait for the host between steps.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
_DONE = object()


class Prefetch(Iterator[T]):
    """`make(k)` for every k of `ks`, in order, at most `depth` ahead of the consumer.

    An exception in `make` is raised in the consumer at the item that failed. `close()`
    (also on garbage collection of a `with` block) stops the thread without waiting for
    the rest of the items."""

    def __init__(self, make: Callable[[int], T], ks: Iterable[int], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, list(ks)), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make, ks):
        try:
            for k in ks:
                if not self._put((True, make(k))):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put((False, e))
            return
        self._put((True, _DONE))

    def __next__(self) -> T:
        ok, item = self._queue.get()
        if not ok:
            self.close()
            raise item
        if item is _DONE:
            self._queue.put((True, _DONE))  # further next() calls keep stopping
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
