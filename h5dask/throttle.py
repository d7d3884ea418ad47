"""Threads that load at once only when that makes the loads faster.

Loads that hold the GIL between short system calls (``np.load`` of small
files, parsing in Python) run slower on two threads than on one: each call
hands the GIL to the other thread, and waiting to get it back costs more
than the call (the convoy effect; 20,000 small ``.npy`` files load 1.6x
slower on 2 threads than on 1 here). Loads that release the GIL for long
(network, decompression, large reads) run faster on more threads.

A :class:`Throttle` measures which kind it has. The first partitions run on
one thread until they have loaded for about :data:`PROBE_SECONDS` (the very
first partition is not counted: it warms up); the next ones run on every
thread until partitions that ran together have loaded as long (in practice,
the first of them to end). It compares the loading time per source and keeps
the faster for the rest of the build, deciding as that partition ends, before
the next one starts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

__all__ = ["Throttle"]

log = logging.getLogger("h5dask")

PROBE_SECONDS = 0.1  # of loading measured on one thread, then on all threads together
SPEEDUP = 1.2  # the least gain of all threads over one that keeps them all


class Throttle:
    """Runs load tasks on up to ``threads`` threads at once, as many as make them faster.

    Tasks return a :class:`~h5dask.engine.Packed` whose ``ids`` and ``seconds``
    are what the throttle measures.

    Parameters
    ----------
    threads : int
        The threads of the pool that calls :meth:`run`.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self.limit = 1
        self.decided = threads <= 1
        self._active = self._arrived = self._started = 0
        self._closed = False
        self._sources = dict.fromkeys((1, threads), 0)
        self._seconds = dict.fromkeys((1, threads), 0.0)
        self._changed = threading.Condition()

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` once fewer tasks than the limit run, in the order tasks arrive."""
        with self._changed:
            ticket = self._arrived
            self._arrived += 1
            self._changed.wait_for(lambda: self._closed or self._may_start(ticket))
            if self._closed:
                raise CancelledError("the build stopped")
            self._active += 1
            self._started += 1
            self._changed.notify_all()  # the next ticket may start too
            measured, level = ticket > 0, self.limit
        try:
            packed = fn(*args)
            if measured:  # before the next task starts, under the limit this one decides
                self._observe(level, len(packed.ids), packed.seconds)
        finally:
            with self._changed:
                self._active -= 1
                self._changed.notify_all()
        return packed

    def close(self) -> None:
        """Make the tasks still waiting for a thread give up."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _may_start(self, ticket: int) -> bool:
        return ticket == self._started and self._active < self.limit

    def _observe(self, level: int, sources: int, seconds: float) -> None:
        with self._changed:
            if self.decided:
                return
            self._sources[level] += sources
            self._seconds[level] += seconds
            if self._seconds[level] < PROBE_SECONDS:
                return
            if level == 1:
                self.limit = self.threads
            else:
                self._decide()

    def _decide(self) -> None:
        solo, shared = (self._seconds[n] / self._sources[n] for n in (1, self.threads))
        speedup = self.threads * solo / shared
        self.decided = True
        if speedup < SPEEDUP:
            self.limit = 1
            log.info(
                "loads hold the GIL: %d threads load %.2fx as fast as one; using one thread",
                self.threads,
                speedup,
            )
