"""Commits that fail and writers that meet (issue 23): nothing is lost or mixed silently.

A commit that fails (a full disk, a write the file system refuses, a reader that keeps the
file open past the writer's wait) raises a named error naming the file and the cause; the
file keeps every commit before it and ``create(mode="a")`` resumes.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

import h5dask as h5m
from h5dask import repair
from h5dask.errors import CommitError, DiskFullError

SOURCES = [str(i) for i in range(60)]


class Big(h5m.Feature):
    """One MiB of float32 holding the source's integer (16 sources make a commit)."""

    def load(self, source):
        return np.full((1, 1 << 18), int(source), dtype=np.float32)


def build(path, sources=SOURCES, **kwargs):
    kwargs.setdefault("scheduler", "sync")
    return h5m.TypedFile.create(path, sources, schema={"big": Big()}, progress=False, **kwargs)


def committed(path) -> list[str]:
    """The committed ids, checking with plain h5py that each holds its own value."""
    with h5py.File(path, "r") as f:
        ids = f["__src__/id"].asstr()[()].tolist()
        refs, values = f["big/refs"][: len(ids)], f["big/values"]
        for id, (start, stop) in zip(ids, refs.tolist(), strict=True):
            assert (values[start:stop] == int(id)).all(), id
    return ids


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (room for one commit of 16 MiB, not two), unmounted afterwards."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)])
    if done.returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_raises_keeps_the_commits_before_and_resumes(small_disk):
    path = small_disk / "full.h5"
    with pytest.raises(DiskFullError) as info:
        build(path)
    message = str(info.value)  # raised at the first commit that failed, not at the end
    assert str(path) in message and "source '16'" in message and "next 16 sources" in message
    assert committed(path) == SOURCES[:16]
    subprocess.run(["mount", "-o", "remount,size=96m", str(small_disk)], check=True)
    build(path, mode="a")
    assert committed(path) == SOURCES


LIMITED = """
import resource, signal, sys
sys.path.insert(0, sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (24 << 20, resource.RLIM_INFINITY))
from test_commit import build
build(sys.argv[1])
"""


def test_a_write_the_file_system_refuses_is_undone_and_raised(tmp_path):
    """Past a file-size limit HDF5's own writes fail (the free-space check passes): the
    journal undoes the commit, and the error names the file and the cause."""
    path = tmp_path / "limited.h5"
    run = subprocess.run(
        [sys.executable, "-c", LIMITED, str(path), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr  # an exception, not a crash of the interpreter
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("h5dask.errors.CommitError"), run.stderr
    assert str(path) in last and "'16' to '31'" in last and "File too large" in last
    assert not repair.needs_repair(path)
    assert committed(path) == SOURCES[:16]
    build(path, mode="a")
    assert committed(path) == SOURCES


HOLD = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "r")  # HDF5's shared lock: the writer cannot lock the file
print("holding", flush=True)
sys.stdin.read()
"""


class Holding(Big):
    """Big, which lets another process hold the file open from source 20 to source 50."""

    holder: subprocess.Popen | None = None
    path = ""

    def load(self, source):
        if source == "20":
            Holding.holder = subprocess.Popen(
                [sys.executable, "-c", HOLD, Holding.path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert Holding.holder.stdout.readline() == "holding\n"
        if source == "50":
            Holding.holder.communicate("")
        return super().load(source)


def test_a_reader_keeping_the_file_past_the_writers_wait_stops_the_build(tmp_path, monkeypatch):
    monkeypatch.setattr(repair, "LOCK_WAIT", 0.2)
    path = tmp_path / "held.h5"
    Holding.path = str(path)
    schema = {"big": Holding()}
    try:
        with pytest.raises(CommitError) as info:
            h5m.TypedFile.create(path, SOURCES, schema=schema, progress=False, scheduler="sync")
    finally:
        if Holding.holder is not None and Holding.holder.poll() is None:
            Holding.holder.kill()
            Holding.holder.wait()
    message = str(info.value)
    assert str(path) in message and "kept it open" in message and "'16' to '31'" in message
    assert info.value.sources == SOURCES[16:32] and isinstance(info.value, OSError)
    assert committed(path) == SOURCES[:16]
    build(path, mode="a")
    assert committed(path) == SOURCES
