"""Commits that fail and writers that meet (issue 23): nothing is lost or mixed silently.

A commit that fails (a full disk, a write the file system refuses, a reader that keeps the
file open past the writer's wait) raises a named error naming the file and the cause; the
file keeps every commit before it and ``create(mode="a")`` resumes.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest

import h5dask as h5m
from h5dask import repair
from h5dask.errors import CommitError, DiskFullError, FileFormatError, FileLockedError
from h5dask.session import lock_path

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
    kept = committed(path)
    assert kept == SOURCES[: len(kept)] and kept  # the commits before it
    message = str(info.value)  # raised at the first commit that failed, not at the end
    assert str(path) in message and f"source '{len(kept)}'" in message and "free" in message
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
    assert not repair.needs_repair(path)
    kept = committed(path)  # what HDF5 wrote of the failed commit was undone
    assert kept == SOURCES[: len(kept)] and kept
    assert str(path) in last and f"sources ('{len(kept)}' to" in last and "File too large" in last
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
    kept = committed(path)
    assert kept == SOURCES[: len(kept)] and 0 < len(kept) <= 21  # up to the holder
    message = str(info.value)
    assert str(path) in message and "kept it open" in message and isinstance(info.value, OSError)
    failed = info.value.sources
    assert failed == SOURCES[len(kept) : len(kept) + len(failed)] and len(kept) + len(failed) < 50
    build(path, mode="a")
    assert committed(path) == SOURCES


# -- one writer per file ------------------------------------------------------------------


class Marked(h5m.Feature):
    """A row holding the source's number, 5 ms a source; the first load touches a marker."""

    def __init__(self, marker=""):
        self.marker = marker

    def load(self, source):
        if self.marker and not os.path.exists(self.marker):
            Path(self.marker).touch()
        time.sleep(0.005)
        return np.full((1, 2), int(source[1:]), dtype=np.int64)


IDS = [f"s{i:04d}" for i in range(300)]

BUILD = """
import sys
sys.path.insert(0, sys.argv[3])
import h5dask as h5m
from test_commit import IDS, Marked
h5m.TypedFile.create(sys.argv[1], IDS, schema={"x": Marked(sys.argv[2])}, progress=False,
                     scheduler="sync")
print("built", flush=True)
"""


def start_build(path, marker) -> subprocess.Popen:
    """A create() of IDS in another process, once its first load has run."""
    build = subprocess.Popen(
        [sys.executable, "-c", BUILD, str(path), str(marker), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not os.path.exists(marker):
        assert build.poll() is None, build.communicate()
        time.sleep(0.01)
    return build


def between_commits(read):
    """``read()`` while another process builds; a read that meets a commit retries."""
    for _ in range(200):
        try:
            return read()
        except FileFormatError as exc:
            assert "committing a batch to it right now" in str(exc)
            time.sleep(0.02)
    raise AssertionError("no read between commits")


def unique_ids(path) -> list[str]:
    """The ids, read with plain h5py; each once, and each row its own source's."""
    with h5py.File(path, "r") as f:
        ids = f["__src__/id"].asstr()[()].tolist()
        refs, values = f["x/refs"][: len(ids)], f["x/values"][()]
    assert len(set(ids)) == len(ids)
    for id, (start, stop) in zip(ids, refs.tolist(), strict=True):
        assert values[start:stop].tolist() == [[int(id[1:])] * 2]
    return ids


@pytest.mark.parametrize("mode", ["a", "w"])
def test_a_second_build_is_refused_at_once_or_waits_when_asked(tmp_path, mode):
    path, marker = tmp_path / "two.h5", tmp_path / "started"
    build = start_build(path, marker)
    try:
        second = tmp_path / "second-loaded"
        with pytest.raises(FileLockedError) as info:
            h5m.TypedFile.create(path, IDS, mode=mode, schema={"x": Marked(second)}, progress=False)
        assert not second.exists()  # refused before any load ran
        message = str(info.value)
        assert str(path) in message and f"process {build.pid} " in message
        assert "BUILD" not in message and "lock_timeout" in message
        assert build.poll() is None  # the first build goes on, its file untouched
        waited = h5m.TypedFile.create(
            path, IDS, mode="a", schema={"x": Marked()}, progress=False, lock_timeout=120
        )
        assert len(waited) == len(IDS)  # it waited for the first build, then skipped its ids
    finally:
        out, err = build.communicate(timeout=120)
    assert build.returncode == 0 and out == "built\n", err
    assert unique_ids(path) == IDS
    assert not os.path.exists(lock_path(path))


def test_an_add_during_a_build_is_refused_and_readers_are_never_blocked(tmp_path):
    path, marker = tmp_path / "added.h5", tmp_path / "started"
    build = start_build(path, marker)
    try:
        file = between_commits(lambda: h5m.TypedFile(path, mode="r+", schema={"x": Marked()}))
        with pytest.raises(FileLockedError, match=f"process {build.pid} "):
            file.add("s0299", {"x": np.zeros((1, 2), np.int64)})  # an id the build writes
        with pytest.raises(FileLockedError):
            h5m.TypedFile(path, mode="a")  # would write the root's attrs
        ids = between_commits(lambda: h5m.TypedFile(path, mode="r").ids.tolist())
        assert set(ids) <= set(IDS)  # no session needed to read
    finally:
        build.communicate(timeout=120)
    assert build.returncode == 0
    assert unique_ids(path) == IDS
    file.add("late", {"x": np.full((1, 2), 7, np.int64)})  # the build ended: this one may write
    file.close()
    assert file.x.get("late").tolist() == [[7, 7]]


HOLD_SESSION = """
import sys, numpy as np
sys.path.insert(0, sys.argv[2])
import h5dask as h5m
file = h5m.TypedFile(sys.argv[1], mode="a")
file.add("a", {"x": np.zeros(2)})
print("holding", flush=True)
sys.stdin.read()
"""


def test_one_typed_file_writes_from_its_first_write_to_its_close(tmp_path):
    path = tmp_path / "session.h5"
    first = h5m.TypedFile(path, mode="w")
    second = h5m.TypedFile(path, mode="r+")
    first.add("a", {"x": np.zeros(2)})
    assert os.path.exists(lock_path(path))
    with pytest.raises(FileLockedError, match="another writer of this process"):
        second.add("b", {"x": np.ones(2)})
    with pytest.raises(FileLockedError):
        second.refresh().x.set("a", np.ones(2))
    assert second.x.get("a").tolist() == [0, 0]  # reads see the first one's commits
    first.add("c", {"x": np.ones(2)})
    first.close()
    assert not os.path.exists(lock_path(path))
    second.add("b", {"x": np.ones(2)})
    del second
    gc.collect()  # garbage collection ends the session too (after committing)
    third = h5m.TypedFile(path, mode="r+")
    third.add("d", {"x": np.ones(2)})
    third.close()
    assert h5m.TypedFile(path).ids.tolist() == ["a", "c", "b", "d"]


def test_a_forked_child_neither_uses_nor_releases_its_parents_session(tmp_path):
    path = tmp_path / "fork.h5"
    file = h5m.TypedFile(path, mode="w")
    file.add("parent", {"x": np.zeros(2)})
    file.flush()
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_child_writes, args=(file, str(path)))
    child.start()
    child.join(60)
    assert child.exitcode == 0  # the child's add was refused (see _child_writes)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SESSION, str(path), str(Path(__file__).parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = holder.communicate("", timeout=60)
    assert "FileLockedError" in err, err  # the parent still holds it, the child gone
    file.add("parent-2", {"x": np.ones(2)})
    file.close()
    assert h5m.TypedFile(path).ids.tolist() == ["parent", "parent-2"]


def _child_writes(file, path) -> None:
    try:
        file.add("child", {"x": np.ones(2)})
    except FileLockedError:
        pass
    else:
        os._exit(3)
    del file  # its finaliser must not release the parent's session
    gc.collect()
    os._exit(0)


def test_a_symlink_at_the_writer_lock_is_refused_and_its_target_never_made(tmp_path):
    target = tmp_path / "elsewhere" / "planted"
    target.parent.mkdir()
    path = tmp_path / "f.h5"
    os.symlink(target, lock_path(str(path)))
    with pytest.raises(FileLockedError, match="symbolic link"):
        h5m.TypedFile(path, mode="w", schema={"x": h5m.Array()})
    assert not target.exists() and not path.exists()
