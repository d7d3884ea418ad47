"""Tests of loads that hang and workers that die during ``create``.

Real parts only: threads, the processes pool, the embedded cluster and a distributed
LocalCluster of worker processes; a feature that hangs (sleeps), one that segfaults
through ``ctypes``. Features are at module level so that worker processes import them.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

import h5dask as h5m
from h5dask.errors import LoadTimeoutError

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
