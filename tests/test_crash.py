"""Crash safety with real processes: kill -9, Ctrl-C, a dead worker, readers while writing.

A build script is written into ``tmp_path`` and run in a subprocess; the test kills it,
then checks what is on disk against what the loader produces for each committed id.
"""

from __future__ import annotations

import importlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import distributed
import h5py
import numpy as np
import psutil
import pytest

import h5dask as h5m
from h5dask import engine
from h5dask import writer as writer_module
from h5dask.cli import main as cli
from h5dask.errors import FileFormatError
from h5dask.repair import journal_path, needs_repair

BUILD = '''
import sys, time
import numpy as np
import h5dask as h5m
from h5dask import engine, writer

N = 3000
SLOW = 0.0
HANG = -1  # the source that takes a minute


class Ragged(h5m.Feature):
    def load(self, source):
        i = int(source[1:])
        time.sleep(60 if i == HANG else SLOW)
        return np.arange((i * 37) % 41 * 16, dtype=np.float32).reshape(-1, 16) + i


class Late(h5m.Feature):
    """Strings from the 1200th source on: its datasets appear mid-build."""

    def load(self, source):
        i = int(source[1:])
        return None if i < 1200 else np.array([f"id {i} " * (i % 5)])


SCHEMA = {"x": Ragged(), "late": Late()}
SOURCES = [f"s{i:04d}" for i in range(N)]


def small_commits():
    """Many small partitions and commits, so that kills land in the middle of commits."""
    engine.MAX_PARTITION = 16
    writer.FLUSH_BYTES = 16 << 10


if __name__ == "__main__":
    SLOW = float(sys.argv[3])
    if sys.argv[4:5] == ["hang"]:  # commits by time only: 16 MiB is more than the build
        HANG = int(sys.argv[5])
    else:
        small_commits()
    print("start", flush=True)
    scheduler = None if sys.argv[2] == "default" else sys.argv[2]
    h5m.TypedFile.create(sys.argv[1], SOURCES, schema=SCHEMA, scheduler=scheduler,
                         n_workers=2, progress=False)
    print("done", flush=True)
'''

READER = """
import sys, time
import h5dask as h5m
from h5dask.errors import H5DaskError
import buildmod

path, stop = sys.argv[1], sys.argv[2]
import os
while not os.path.exists(stop):
    try:
        f = h5m.TypedFile(path)
        ids = f.ids.tolist()
        assert ids == buildmod.SOURCES[: len(ids)]
        for id in ids[-20:]:
            got = f.get(id)
            for name, feature in buildmod.SCHEMA.items():
                want = feature.load(id)
                assert (want is None and name not in got) or (got[name] == want).all(), id
        print("ok", len(ids), flush=True)
    except H5DaskError as exc:
        print("busy", type(exc).__name__, str(exc).replace(chr(10), " "), flush=True)
    time.sleep(0.01)
"""


@pytest.fixture
def build(tmp_path):
    """The build script's module (imported here too, so the test can run its loaders)."""
    (tmp_path / "buildmod.py").write_text(BUILD)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("buildmod")
        yield importlib.reload(module)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("buildmod", None)


def create(build, path, mode="w", scheduler="sync", **kwargs):
    return h5m.TypedFile.create(
        path, build.SOURCES, mode=mode, schema=build.SCHEMA, scheduler=scheduler, progress=False,
        **kwargs,
    )  # fmt: skip


def snapshot(path) -> dict:
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            strings = h5py.check_string_dtype(obj.dtype)
            data = obj.asstr()[()].tolist() if strings else obj[()].tobytes()
            out[name] = (obj.dtype.str, obj.shape, obj.chunks, data)

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def check_committed_prefix(build, path) -> int:
    """Every committed id is a prefix of the sources and reads back as its loader's output."""
    with h5py.File(path, "r") as f:
        ids = f["__src__/id"].asstr()[()].tolist()
        assert ids == build.SOURCES[: len(ids)]
        for name, feature in build.SCHEMA.items():
            if name not in f or "values" not in f[name]:
                continue
            values = f[name]["values"]
            values = values.asstr() if h5py.check_string_dtype(values.dtype) else values
            refs = f[name]["refs"][: len(ids)]
            assert refs.shape == (len(ids), 2)
            for id, (start, stop) in zip(ids, refs.tolist(), strict=True):
                want = feature.load(id)
                if want is None:
                    assert start == stop == -1, (name, id)
                    continue
                assert 0 <= start <= stop <= values.shape[0], (name, id, start, stop)
                assert np.array_equal(values[start:stop], want), (name, id)
    return len(ids)


def spawn(tmp_path, *args):
    script = tmp_path / "buildmod.py"
    return subprocess.Popen(
        [sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, text=True
    )


def test_kill_9_at_random_moments_then_repair_and_resume(tmp_path, build, monkeypatch, caplog):
    clean = tmp_path / "clean.h5"
    monkeypatch.setattr(engine, "MAX_PARTITION", 16)  # as build.small_commits(), undone after
    monkeypatch.setattr(writer_module, "FLUSH_BYTES", 16 << 10)
    create(build, clean)
    expected = snapshot(clean)
    rng = random.Random(8)
    path = tmp_path / "k.h5"
    mid_commit = 0
    for trial in range(10):
        process = spawn(tmp_path, path, "sync", 0)
        assert process.stdout.readline().strip() == "start"
        time.sleep(rng.uniform(0.1, 0.9))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not path.exists() or not (needs_repair(path) or h5py.is_hdf5(path)):
            continue  # killed while mode "w" created the file (not journaled): nothing committed
        if needs_repair(path):
            mid_commit += 1
            args = ["-m", "h5dask", "repair", str(path)]
            if trial % 3 == 0:  # the command line in a process of its own
                out = subprocess.run([sys.executable, *args], capture_output=True, text=True)
                assert out.returncode == 0 and "undid an unfinished commit" in out.stdout
            elif trial % 3 == 1:
                assert cli(["repair", str(path)]) == 0
            else:  # a reader repairs it, and says so
                caplog.clear()
                h5m.TypedFile(path)
                assert "undid the unfinished commit" in caplog.text
        assert not os.path.exists(journal_path(path))
        n = check_committed_prefix(build, path)
        assert len(h5m.TypedFile(path)) == n
        create(build, path, mode="a")
        assert snapshot(path) == expected, f"trial {trial}: the resumed file differs"
    assert mid_commit >= 1, "no kill landed in the middle of a commit: the test proves nothing"


@pytest.mark.parametrize(
    ("scheduler", "slow", "hang"),
    [("default", 0.004, -1), ("threads", 0.0, 100)],
    ids=["slow-sources", "a-source-hangs"],
)
def test_a_build_killed_mid_way_keeps_what_was_loaded_seconds_before(
    tmp_path, build, scheduler, slow, hang
):
    """The writer commits every 2 s (``commit_seconds``) while results come, and while it
    waits for a partition that takes long: the results before it are committed."""
    clean = tmp_path / "clean.h5"
    create(build, clean)
    path = tmp_path / "k.h5"
    process = spawn(tmp_path, path, scheduler, slow, "hang", hang)
    assert process.stdout.readline().strip() == "start"
    time.sleep(5.0)  # 3000 slow sources take about 7 s on 2 workers
    process.send_signal(signal.SIGKILL)
    process.wait()
    n = check_committed_prefix(build, path)
    assert 0 < n < len(build.SOURCES)
    if hang >= 0:
        assert hang // 2 < n <= hang  # the partitions before the hung one's
    create(build, path, mode="a")
    assert snapshot(path) == snapshot(clean)


def test_repair_of_a_clean_file_changes_nothing(tmp_path, build, capsys):
    path = tmp_path / "c.h5"
    create(build, path)
    before = snapshot(path)
    assert cli(["repair", str(path)]) == 0
    assert "nothing to repair; 3000 committed ids" in capsys.readouterr().out
    assert snapshot(path) == before
    assert cli(["repair", str(tmp_path / "missing.h5")]) == 1


def test_readers_while_writing_see_a_committed_prefix_or_a_clear_error(
    tmp_path, build, monkeypatch
):
    path, stop = tmp_path / "r.h5", tmp_path / "stop"
    (tmp_path / "reader.py").write_text(READER)
    # commits of 16 sources back to back: synced (25 ms each), they leave readers no gap
    monkeypatch.setenv("DASK_H5DASK__DURABLE", "False")
    writer = spawn(tmp_path, path, "sync", 0.0003)
    assert writer.stdout.readline().strip() == "start"
    paths = [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    reader = subprocess.Popen(
        [sys.executable, str(tmp_path / "reader.py"), str(path), str(stop)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert writer.stdout.readline().strip() == "done"
        assert writer.wait(timeout=60) == 0
    finally:
        stop.touch()
        out, err = reader.communicate(timeout=60)
    lines = out.splitlines()
    assert reader.returncode == 0, err
    counts = [int(line.split()[1]) for line in lines if line.startswith("ok")]
    assert counts and counts == sorted(counts), "readers saw no commit, or commits going back"
    for line in lines:
        if line.startswith("busy"):
            assert "FileFormatError" in line and str(path) in line
            assert "another process" in line or "h5dask repair" in line
    assert check_committed_prefix(build, path) == 3000


def test_a_killed_worker_loses_nothing(tmp_path, build, monkeypatch):
    clean = tmp_path / "clean.h5"
    create(build, clean)
    # the worker processes import buildmod from tmp_path
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.run(lambda: __import__("buildmod").__setattr__("SLOW", 0.001))
        pids = list(client.run(os.getpid).values())

        def kill_one():
            time.sleep(1.0)
            os.kill(pids[0], signal.SIGKILL)

        killer = threading.Thread(target=kill_one)
        killer.start()
        path = tmp_path / "w.h5"
        create(build, path, scheduler=client)
        killer.join()
        assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == "zombie"
    assert snapshot(path) == snapshot(clean)


MAP = """
import sys, time
from pathlib import Path
import numpy as np, psutil, h5py
import h5dask as h5m

def slow(x):
    Path(sys.argv[2]).touch()
    time.sleep(0.005)
    return x * 2

class X(h5m.Feature):
    def load(self, source):
        return np.arange(int(source) % 7 + 1)

if __name__ == "__main__":
    f = h5m.TypedFile.create(sys.argv[1], [str(i) for i in range(2000)], schema={"x": X()},
                             scheduler="sync", progress=False)
    f = h5m.TypedFile(sys.argv[1], mode="r+")
    print("built", flush=True)
    try:
        f.get_proxy("x").map({"y": slow}, n_workers=2, progress=False)
    except KeyboardInterrupt:
        left = [p.cmdline() for p in psutil.Process().children(recursive=True)]
        helpers = ("resource_tracker", "multiprocessing.forkserver")  # they stay, by design
        left = [c for c in left if not any(h in " ".join(c) for h in helpers)]
        with h5py.File(sys.argv[1], "r") as h:
            n = h["__src__/id"].shape[0]
            y = h["y/refs"][:] if "y" in h else np.zeros((0, 2), int)
            values = h["y/values"][:] if "y" in h else np.zeros(0)
            ok = all(
                (values[a:b] == np.arange(int(i) % 7 + 1) * 2).all()
                for i, (a, b) in enumerate(y.tolist()) if a >= 0
            )
            print("interrupted", left, n, int((y[:, 0] >= 0).sum()), ok, sep="|", flush=True)
"""


def test_ctrl_c_during_map_stops_the_cluster_and_keeps_the_committed_prefix(tmp_path):
    script, started = tmp_path / "map.py", tmp_path / "started"
    script.write_text(MAP)
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "m.h5"), str(started)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "built"
        deadline = time.monotonic() + 60
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    word, left, n, mapped, ok = out.strip().split("|")
    assert word == "interrupted" and left == "[]" and n == "2000" and ok == "True"
    assert 0 <= int(mapped) < 2000


def test_journal_states_a_reader_can_meet(tmp_path):
    """No commit, a live one, a dead writer's; and a commit that ends while it is looked at."""
    import fcntl

    from h5dask.handle import journal_state

    path = tmp_path / "j.h5"
    h5py.File(path, "w").close()
    assert journal_state(str(path)) == "none"
    fd = os.open(journal_path(path), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer holds it during a commit
    assert journal_state(str(path)) == "live"
    with pytest.raises(FileFormatError, match="another process is committing"):
        h5m.TypedFile(path, mode="r")
    os.close(fd)  # the writer died before its journal had a header: the journal stays, unlocked
    assert journal_state(str(path)) == "dead"
    h5m.TypedFile(path, mode="r")  # a reader undoes the dead commit (nothing, here)
    assert journal_state(str(path)) == "none"


def test_a_commit_that_ends_while_a_reader_checks_is_no_dead_writer(tmp_path, monkeypatch):
    """The writer unlinks its journal, then unlocks it: a reader between the two sees no commit."""
    import fcntl

    from h5dask import handle

    path = tmp_path / "j.h5"
    h5py.File(path, "w").close()
    fd = os.open(journal_path(path), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    real_flock = fcntl.flock

    def commit_ends_first(reader_fd: int, operation: int) -> None:
        os.unlink(journal_path(path))
        os.close(fd)
        real_flock(reader_fd, operation)

    monkeypatch.setattr(fcntl, "flock", commit_ends_first)
    assert handle.journal_state(str(path)) == "none"


def test_file_systems_without_locks_write_repair_and_explain(tmp_path, monkeypatch):
    """As on NFS without its lock daemon or Lustre without ``flock``: every flock fails."""
    import errno
    import fcntl

    from h5dask.repair import JournaledFile

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = tmp_path / "n.h5"
    with h5m.TypedFile(path, mode="w") as file:  # commits go through the journal, unlocked
        for i in range(20):
            file.add(str(i), {"x": np.full(3, i)})
    assert not needs_repair(path)
    committed = path.read_bytes()
    raw = JournaledFile(str(path))  # a writer that dies mid-commit, having overwritten
    raw.seek(0)
    raw.write(b"\0" * 4096)
    raw.truncate(4096)  # writes what it held, once the journal has the old pages
    raw.abandon()
    assert path.read_bytes() != committed
    with pytest.raises(FileFormatError, match="no locks to tell which") as info:
        h5m.TypedFile(path, mode="r")
    assert str(path) in str(info.value) and "h5dask repair" in str(info.value)
    with h5m.TypedFile(path, mode="a") as file:  # a writer undoes the dead commit first
        file.add("20", {"x": np.full(3, 20)})
    with h5m.TypedFile(path, mode="r") as file:
        assert [file.x.get(str(i)).tolist() for i in range(21)] == [[i] * 3 for i in range(21)]
    assert not needs_repair(path)


def test_the_journal_saves_each_run_of_old_pages_once_and_repair_restores_them(tmp_path):
    from h5dask.repair import PAGE, JournaledFile, _read_journal, repair

    path = tmp_path / "f.bin"
    original = np.random.default_rng(0).bytes(5 * PAGE + 100)
    path.write_bytes(original)
    raw = JournaledFile(str(path), lock=False)
    raw.seek(PAGE + 10)
    raw.write(b"a" * 100)  # saves page 1
    raw.seek(10)
    raw.write(b"b" * 3 * PAGE)  # pages 0 to 3: saves page 0, then pages 2 and 3 as one run
    raw.seek(5 * PAGE - 20)
    raw.write(b"c" * 500)  # the last page, partly past the old end
    raw.truncate(3 * PAGE)
    fd = os.open(journal_path(path), os.O_RDONLY)
    journal = _read_journal(fd, str(path))
    size, records = journal.size, journal.records
    os.close(fd)
    assert size == len(original)
    assert [(offset, len(data)) for offset, data in records] == [
        (PAGE, PAGE),
        (0, PAGE),
        (2 * PAGE, 2 * PAGE),
        (4 * PAGE, PAGE + 100),
    ]
    raw.abandon()
    assert path.read_bytes() != original
    assert repair(path) and path.read_bytes() == original


DIES_MID_COMMIT = """
import os, sys
import numpy as np
import h5dask as h5m
from h5dask import format as fmt


def die(*args):
    os._exit(3)  # dead after writing the values, before committing the ids


with h5m.TypedFile(sys.argv[1], mode="a") as file:
    file._get_writer().flush_seconds = None  # one commit of all 400 adds
    fmt.append_ids = die
    for i in range(10, 410):
        file.add(str(i), {"x": np.full((2, 16), -i, np.float32)})
"""


def test_a_writer_dead_after_writing_into_the_unused_end_of_a_chunk_loses_nothing(tmp_path):
    """The journal does not save the unused end of the last chunk of ``values``, which the
    next commit fills: once repaired, the file holds its last commit, whatever the dead
    writer left past it, and the next appends (fewer rows than it wrote) read back right."""
    path = tmp_path / "tail.h5"
    with h5m.TypedFile(path, mode="w") as file:
        for i in range(10):
            file.add(str(i), {"x": np.full((2, 16), i, np.float32)})
    with h5py.File(path) as f:
        assert f["x/values"].chunks[0] > 1000  # the dead writer's 800 rows go into chunk 0
    script = tmp_path / "dies.py"
    script.write_text(DIES_MID_COMMIT)
    assert subprocess.run([sys.executable, str(script), str(path)]).returncode == 3
    assert needs_repair(path)
    assert os.path.getsize(journal_path(path)) < 800 * 64  # the rows' pages were not saved
    with h5m.TypedFile(path, mode="a") as file:  # repairs first
        file.add("10", {"x": np.full((1, 16), 10, np.float32)})
    with h5m.TypedFile(path) as file:
        assert file.ids.tolist() == [str(i) for i in range(11)]
        for i in range(10):
            assert np.array_equal(file.x.get(str(i)), np.full((2, 16), i, np.float32))
        assert np.array_equal(file.x.get("10"), np.full((1, 16), 10, np.float32))
    with h5py.File(path) as f:
        assert f["x/values"].shape == (21, 16)


LABELLING = """
import inspect, sys, time
import numpy as np
import h5dask as h5m


class SlowAttrs(h5m.Array):
    @property
    def attrs(self):  # slow while written into the file (it is checked before): the kill lands
        if any(frame.function == "init_schema" for frame in inspect.stack()):
            print("labelling", flush=True)
            time.sleep(60)
        return {}


h5m.TypedFile(sys.argv[1], mode=sys.argv[2], schema={"x": SlowAttrs()})
"""


@pytest.mark.parametrize("mode", ["w", "a"])
def test_a_writer_killed_while_opening_leaves_the_file_as_it_was(tmp_path, mode):
    """Mode "w" used to truncate the file before labelling it (a kill left a file without an
    HDF5 signature), and mode "a" labelled an existing file outside the journal."""
    path = tmp_path / "f.h5"
    with h5m.TypedFile(path, mode="w", schema={"x": h5m.Array()}) as f:
        for i in range(50):
            f.add(f"id{i}", {"x": np.full(3, i)})
    script = tmp_path / "label.py"
    script.write_text(LABELLING)
    process = subprocess.Popen(
        [sys.executable, str(script), str(path), mode], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "labelling"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    if needs_repair(path):
        assert cli(["repair", str(path)]) == 0
    f = h5m.TypedFile(path)
    assert f.ids.tolist() == [f"id{i}" for i in range(50)]
    assert f.x.get("id7").tolist() == [7, 7, 7]
    again = h5m.TypedFile(path, mode="w", schema={"x": h5m.Array()})  # and the leftovers go
    assert len(again.ids) == 0
    assert sorted(os.listdir(tmp_path)) == ["f.h5", "label.py"]


INTERRUPTED_COMMIT = """
import os, signal, sys, threading, time
import numpy as np
import h5dask as h5m
from h5dask.repair import journal_path

path = sys.argv[1]


def interrupt_mid_commit():
    while not os.path.exists(journal_path(path)):  # the commit has begun
        time.sleep(0.0005)
    os.kill(os.getpid(), signal.SIGINT)


f = h5m.TypedFile(path, mode="w", schema={"x": h5m.Array()})
threading.Thread(target=interrupt_mid_commit, daemon=True).start()
try:
    f.add("big", {"x": np.ones((50, 1 << 20), dtype=np.uint8)})  # 50 MiB: a commit at once
    f.flush()
    time.sleep(5)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_during_a_commit_lets_it_finish_then_interrupts(tmp_path):
    """A KeyboardInterrupt raised in HDF5's write callback failed the commit as "driver
    write request failed" (a CommitError, not the interrupt); it now comes after it."""
    script, path = tmp_path / "commit.py", tmp_path / "f.h5"
    script.write_text(INTERRUPTED_COMMIT)
    out = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "interrupted", out.stderr[-2000:]
    assert not needs_repair(path)
    f = h5m.TypedFile(path)
    assert f.ids.tolist() == ["big"] and int(f.x.get("big").sum()) == 50 << 20
