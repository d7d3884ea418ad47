"""Tests of loads that hang and workers that die during ``create``.

Real parts only: threads, the processes pool, the embedded cluster and a distributed
LocalCluster of worker processes; a feature that hangs (sleeps), one that segfaults
through ``ctypes``. Features are at module level so that worker processes import them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

import dask
import distributed
import numpy as np
import psutil
import pytest

import h5dask as h5m
from h5dask.errors import LoadTimeoutError, WorkerError

SOURCES = [f"s{i:03d}" for i in range(40)]


class Hangs(h5m.Feature):
    """``s007`` sleeps 30 s (a load that hangs); the others take 20 ms."""

    def load(self, source):
        time.sleep(30 if source == "s007" else 0.02)
        return np.full(3, int(source[1:]), dtype=np.int32)


class Label(h5m.Feature):
    def load(self, source):
        return source


SCHEMA = {"meta": h5m.Group(label=Label()), "x": Hangs()}


def build(path, **kwargs):
    return h5m.TypedFile.create(path, SOURCES, schema=SCHEMA, progress=False, **kwargs)


@pytest.mark.parametrize("scheduler", ["threads", "processes", "sync"])
def test_a_hung_load_is_skipped_by_name_and_the_build_goes_on(tmp_path, scheduler):
    start = time.monotonic()
    file = build(tmp_path / "h.h5", scheduler=scheduler, n_workers=2, timeout=1.0, on_error="skip")
    assert time.monotonic() - start < 25  # not the 30 s of the hung load
    assert file.ids.tolist() == [s for s in SOURCES if s != "s007"]
    assert file.get("s039")["x"].tolist() == [39, 39, 39]
    (failure,) = file.errors
    assert (failure.source, failure.feature) == ("s007", "x")
    assert "more than 1 s" in failure.message and "test_workers.py" in failure.message


def test_a_hung_load_raises_naming_source_and_feature_and_keeps_what_came_before(tmp_path):
    path = tmp_path / "r.h5"
    with pytest.raises(LoadTimeoutError, match=r"source 's007', feature 'x': load\(\) ran") as e:
        build(path, scheduler="threads", n_workers=2, timeout=1.0)
    assert isinstance(e.value, TimeoutError) and "time.sleep" not in str(e.value)
    assert h5m.TypedFile(path).ids.tolist() == SOURCES[:7]
    build(path, scheduler="threads", n_workers=2, timeout=1.0, mode="a", on_error="skip")
    assert len(h5m.TypedFile(path)) == len(SOURCES) - 1


def test_a_partition_longer_than_the_timeout_is_no_hang(tmp_path):
    """40 loads of 20 ms in one partition: 0.8 s, longer than a 0.1 s timeout per source."""
    sources = [s for s in SOURCES if s != "s007"]
    file = h5m.TypedFile.create(
        tmp_path / "p.h5", sources, schema={"x": Hangs()}, scheduler="sync", progress=False,
        timeout=0.1,
    )  # fmt: skip
    assert file.ids.tolist() == sources and not file.errors


@pytest.mark.parametrize("bad", [0, -1.0, "5"])
def test_timeouts_and_commit_cadences_must_be_positive_seconds(tmp_path, bad):
    for option in ("timeout", "commit_seconds"):
        with pytest.raises(ValueError, match=f"{option} must be a number of seconds > 0"):
            build(tmp_path / "v.h5", scheduler="sync", **{option: bad})


# -- workers that die ---------------------------------------------------------------------


class Crashes(h5m.Feature):
    """``s050`` crashes its process while the file ``marker`` exists: a segfault through
    ctypes, or (``once``) ``os._exit`` after removing the marker, so that a rerun succeeds."""

    def __init__(self, marker: str, once: bool = False):
        self.marker, self.once = marker, once

    def load(self, source):
        if source == "s050" and os.path.exists(self.marker):
            if self.once:
                os.remove(self.marker)
                os._exit(1)
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        time.sleep(0.002)
        return np.full(2, int(source[1:]), dtype=np.int64)


MANY = [f"s{i:03d}" for i in range(200)]


def crash_build(path, marker, scheduler, once=False, mode="w"):
    schema = {"x": Crashes(str(marker), once)}
    return h5m.TypedFile.create(
        path, MANY, schema=schema, scheduler=scheduler, n_workers=2, progress=False, mode=mode
    )


@pytest.fixture
def cluster_of_processes():
    """A LocalCluster of 2 worker processes that gives up on a task after 2 worker deaths."""
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


@pytest.mark.parametrize("where", ["processes", "cluster"])
def test_a_feature_that_segfaults_names_its_sources_and_the_build_resumes(tmp_path, where, request):
    scheduler = request.getfixturevalue("cluster_of_processes") if where == "cluster" else where
    marker, path = tmp_path / "crash", tmp_path / "c.h5"
    marker.touch()
    named = r"sources 's0\d\d' to 's0\d\d' \(\d+\), features 'x'"
    with pytest.raises(WorkerError, match=named) as e:
        crash_build(path, marker, scheduler)
    error = e.value
    assert "s050" in error.sources and error.features == ["x"]
    assert "mode='a'" in str(error) and f"before {error.sources[0]!r} is committed" in str(error)
    assert h5m.TypedFile(path).ids.tolist() == MANY[: MANY.index(error.sources[0])]
    marker.unlink()
    crash_build(path, marker, scheduler, mode="a")
    file = h5m.TypedFile(path)
    assert file.ids.tolist() == MANY and file.get("s199")["x"].tolist() == [199, 199]


def test_a_worker_process_that_died_once_loses_nothing(tmp_path):
    marker = tmp_path / "exit"
    marker.touch()
    file = crash_build(tmp_path / "o.h5", marker, "processes", once=True)
    assert not marker.exists()  # s050's load did exit its process
    assert file.ids.tolist() == MANY and file.get("s050")["x"].tolist() == [50, 50]


def test_every_worker_of_a_cluster_killed_loses_nothing(tmp_path):
    """Their replacements run the tasks again, and get the ids and features again (as
    data scattered to the dead workers, they were lost: FutureCancelledError). Dask's
    default allowed-failures: workers killed at once count as deaths of each task that
    ran on them, including the one that gives them the features."""
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        pids = list(client.run(os.getpid).values())
        killer = threading.Timer(1.0, lambda: [os.kill(pid, signal.SIGKILL) for pid in pids])
        killer.start()
        slow = [f"s{i:03d}" for i in range(400)]
        schema = {"x": Crashes(str(tmp_path / "never")), "wait": Hangs()}  # 20 ms a source
        file = h5m.TypedFile.create(
            tmp_path / "k.h5", slow, schema=schema, scheduler=client, progress=False
        )
        killer.join()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
    assert file.ids.tolist() == slow and file.get("s399")["x"].tolist() == [399, 399]


def test_an_embedded_cluster_whose_workers_die_as_it_starts_is_a_named_error(tmp_path):
    preload = tmp_path / "die_at_start.py"
    preload.write_text("import os\nos._exit(3)\n")
    with (
        dask.config.set({"distributed.worker.preload": [str(preload)]}),
        pytest.raises(WorkerError, match="the embedded dask cluster did not start") as e,
    ):
        h5m.TypedFile.create(
            tmp_path / "s.h5", SOURCES, schema={"x": Label()}, progress=False, n_workers=1
        )
    assert "mode='a'" in str(e.value) and e.value.__cause__ is not None
