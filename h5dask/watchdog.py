"""Loads watched for hangs (``create(..., timeout=seconds)``).

With a timeout, the loads of a partition run one source after another in a
thread of their own, which the task's thread watches. A source whose loads
run longer than the timeout gets a :class:`~h5dask.errors.LoadTimeoutError`
naming the feature that was running and the line its code was at, and a new
thread loads the partition's next sources. Python cannot stop a thread: the
hung one is left behind (a daemon thread, which does not keep its process
alive) and ends once its load returns, dropping what it loaded.

A load that holds the GIL (a C extension computing without releasing it)
stops the watching thread too: no timeout can report it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .errors import LoadTimeoutError
from .extract import feature_running

__all__ = ["load_watched"]


def load_watched(
    ids: Sequence[str], load: Callable[[str], Any], timeout: float, features: Sequence[str]
) -> list[Any]:
    """``[load(id) for id in ids]``, a :class:`LoadTimeoutError` in place of each load that
    ran longer than ``timeout`` seconds (``features``: the schema's, named when the hung
    feature cannot be told)."""
    results: list[Any] = []
    while len(results) < len(ids):
        lane = _Lane(ids, len(results), load)
        hung = lane.watch(timeout)
        if lane.error is not None:  # not a load's error (those are results): a bug, Ctrl-C
            raise lane.error
        results.extend(lane.results)
        if hung is not None:
            feature, where = _whereabouts(lane.thread, features)
            cause = (
                f"load() ran for more than {timeout:g} s (timeout={timeout:g}), at {where}; "
                "its thread is left behind and stops once its load returns"
            )
            results.append(LoadTimeoutError(ids[hung], feature, cause))
    return results


class _Lane:
    """A daemon thread loading ``ids[start:]`` in order, until it is abandoned."""

    def __init__(self, ids: Sequence[str], start: int, load: Callable[[str], Any]):
        self.ids, self.load = ids, load
        self.results: list[Any] = []
        self.current = (start, time.monotonic())  # the position loading and since when
        self.abandoned = False
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="h5dask-watched-load", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for k in range(self.current[0], len(self.ids)):
                result = self.load(self.ids[k])
                with self.lock:
                    if self.abandoned:
                        return
                    self.results.append(result)
                    self.current = (k + 1, time.monotonic())
        except BaseException as exc:  # raised again by the watching thread
            with self.lock:
                self.error = exc
        finally:
            self.done.set()

    def watch(self, timeout: float) -> int | None:
        """Wait until every id is loaded (None), or one has loaded for ``timeout`` seconds:
        abandon the thread then and return that id's position."""
        while True:
            position, since = self.current
            if self.done.wait(max(0.0, since + timeout - time.monotonic())):
                return None
            with self.lock:
                if self.error is None and self.current == (position, since):
                    self.abandoned = True
                    return position
                if self.error is not None:
                    return None


def _whereabouts(thread: threading.Thread, features: Sequence[str]) -> tuple[str, str]:
    """The feature whose load ``thread`` runs (else ``features``), and the line it is at."""
    frame = sys._current_frames().get(thread.ident or -1)
    if frame is None:
        return ", ".join(features), "an unknown line"
    where = f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}()"
    return feature_running(frame) or ", ".join(features), where
