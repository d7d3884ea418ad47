"""The threads scheduler runs loads at once only when that makes them faster."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import numpy as np
import pytest

import h5dask as h5m
from h5dask.engine import Packed
from h5dask.throttle import Throttle


class Tasks:
    """Tasks that report a given time per source, and count how many ran at once."""

    def __init__(self, solo: float, shared: float, sources: int = 100):
        self.solo, self.shared, self.sources = solo, shared, sources
        self.running = self.most = 0
        self.order: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, k: int) -> Packed:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.order.append(k)
            together = self.running > 1
        time.sleep(0.005)  # let the others start, if the throttle allows them
        with self.lock:
            together = together or self.running > 1
            self.running -= 1
        per_source = self.shared if together else self.solo
        ids = [f"{k}-{i}" for i in range(self.sources)]
        return Packed(ids, {}, {}, {}, {}, seconds=per_source * self.sources)


def run_tasks(throttle: Throttle, tasks: Tasks, n: int) -> list[Packed]:
    with ThreadPoolExecutor(throttle.threads) as pool:
        futures = [pool.submit(throttle.run, tasks, k) for k in range(n)]
        return [f.result() for f in futures]


def test_loads_that_slow_down_together_go_back_to_one_thread(caplog):
    # 4 threads load 4 * 1 / 5 = 0.8x as fast as one: keep one
    throttle, tasks = Throttle(4), Tasks(solo=1e-3, shared=5e-3)
    with caplog.at_level(logging.INFO, logger="h5dask"):
        results = run_tasks(throttle, tasks, 60)
    assert [p.ids[0] for p in results] == [f"{k}-0" for k in range(60)]
    assert throttle.decided and throttle.limit == 1
    assert "hold the GIL: 4 threads load 0.80x as fast as one" in caplog.text
    assert tasks.most == 4  # they were tried together
    tasks.most = 0
    run_tasks(throttle, tasks, 10)
    assert tasks.most == 1


def test_loads_that_gain_from_threads_keep_them_all():
    throttle, tasks = Throttle(4), Tasks(solo=1e-3, shared=2e-3)  # 2x as fast on 4 threads
    run_tasks(throttle, tasks, 60)
    assert throttle.decided and throttle.limit == 4


def test_the_first_partitions_run_alone_and_in_order():
    throttle, tasks = Throttle(8), Tasks(solo=1e-5, shared=1e-5)  # 1 ms of loading a task
    run_tasks(throttle, tasks, 50)
    assert tasks.most == 1 and tasks.order == list(range(50))
    assert throttle.limit == 1 and not throttle.decided
    run_tasks(throttle, tasks, 60)  # the probe on one thread ends after 0.1 s of loading
    assert throttle.limit == 8 and tasks.most > 1


def test_one_thread_needs_no_probe():
    throttle, tasks = Throttle(1), Tasks(solo=1e-3, shared=1e-3)
    assert throttle.decided
    run_tasks(throttle, tasks, 5)
    assert tasks.order == list(range(5))


def test_closing_releases_the_tasks_waiting_for_a_thread():
    throttle = Throttle(2)
    started, release = threading.Event(), threading.Event()

    def blocking() -> Packed:
        started.set()
        release.wait(10)
        return Packed(["a"], {}, {}, {}, {})

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(throttle.run, blocking)
        started.wait(10)
        waiting = pool.submit(throttle.run, blocking)  # the limit is one: it waits
        time.sleep(0.05)
        assert not waiting.done()
        throttle.close()
        with pytest.raises(CancelledError):
            waiting.result(timeout=10)
        release.set()
        assert first.result(timeout=10).ids == ["a"]


class Sleepy(h5m.Feature):
    """A load that releases the GIL (it waits, as for the network) and notes the overlap."""

    running = 0
    most = 0
    lock = threading.Lock()

    def load(self, source: str) -> np.ndarray:
        with Sleepy.lock:
            Sleepy.running += 1
            Sleepy.most = max(Sleepy.most, Sleepy.running)
        time.sleep(0.002)
        with Sleepy.lock:
            Sleepy.running -= 1
        return np.full(3, int(source), dtype=np.int64)


def test_loads_that_release_the_gil_run_on_every_thread(tmp_path):
    Sleepy.most = 0
    ids = [str(i) for i in range(400)]
    file = h5m.TypedFile.create(
        tmp_path / "s.h5",
        ids,
        schema={"x": Sleepy()},
        scheduler="threads",
        n_workers=4,
        progress=False,
    )
    assert Sleepy.most == 4
    assert np.array_equal(file.get_proxy("x")[:], np.repeat(np.arange(400), 3))
