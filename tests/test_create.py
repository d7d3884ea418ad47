"""Tests of TypedFile.create on dask: every scheduler, byte-identical files, every error path.

Real parts only: a distributed LocalCluster of 2 worker processes (one per module), the
threads, processes and sync schedulers, the embedded cluster, files on disk, ``memory://``
and a local HTTP server. Features are defined at module level so that worker processes
can import them (pytest puts ``tests/`` on ``sys.path``, which spawned workers inherit).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing
import os
import platform
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import dask
import distributed
import h5py
import numpy as np
import psutil
import pytest

import h5dask as h5m
from h5dask import engine
from h5dask.errors import ConcatError, LoadError, SchemaError, SourceError
from h5dask.sources import open_source

# -- features (module level: worker processes import them) --------------------------------


class Ragged(h5m.Feature):
    """``"n:k"`` -> ``n`` rows of 3 float32 (``n`` may be 0); ``"none:k"`` -> no data."""

    def load(self, source):
        n, k = source.split(":")
        if n == "none":
            return None
        rows = np.arange(int(n), dtype=np.float32)[:, None]
        return rows + np.array([int(k), 0.5, -1.0], dtype=np.float32)

    def after_create(self, file, feature_key):
        file.handle()[feature_key].attrs["n_rows"] = len(file.get_proxy(feature_key))


class Twice(h5m.Feature):
    derived_from = "x"

    def load(self, x):
        return x * 2


class Name(h5m.Feature):
    __re__ = r"^[1-9]"  # sources with at least one row

    def load(self, source):
        return f"source {source} é"


class Label(h5m.Feature):
    __re__ = r"^\d"

    def load(self, source):
        return int(source.split(":")[1]) % 5


class RaggedFile(h5m.TypedFile):
    data = h5m.Group(x=Ragged(), twice=Twice(), kind=Name())
    label = Label()

    def after_create(self):
        self.handle().attrs["n_ids_after_create"] = len(self)


class Payload(h5m.Feature):
    """The bytes of a file or URL, read with ``open_source``; ``b"bad..."`` fails."""

    __re__ = r"\.bin$"

    def __init__(self, log_dir: str | None = None):
        self.log_dir = log_dir

    def load(self, source):
        if self.log_dir is not None:  # one file per call: a lock-free log across processes
            name = source.replace("/", "_").replace(":", "_")
            Path(self.log_dir, f"{name}-{uuid.uuid4().hex}").touch()
        with open_source(source) as f:
            data = f.read()
        if data.startswith(b"bad"):
            raise ValueError(f"corrupt payload {data[:8]!r}")
        return np.frombuffer(data, dtype=np.uint8)


class Flaky(h5m.Feature):
    """Fails on sources holding ``"bad"``; ``"lock"`` raises an exception that cannot pickle."""

    def load(self, source):
        if "lock" in source:
            raise LockedError(f"stuck on {source}")
        if "bad" in source:
            raise ValueError(f"cannot parse {source}")
        return np.array([len(source)], dtype=np.int64)


class LockedError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.lock = threading.Lock()


class Shaped(h5m.Feature):
    """``"name-width-dtype"`` -> zeros of shape (2, width) and that dtype."""

    __re__ = r"^\w+-\d+-\w+$"

    def load(self, source):
        _, width, dtype = source.split("-")
        return np.zeros((2, int(width)), dtype=dtype)


class Filler(h5m.Feature):
    """``nbytes`` bytes of float32 a source."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def load(self, source):
        return np.ones((1, self.nbytes // 4), dtype=np.float32)


class Where(h5m.Feature):
    """Where the load ran: ``[pid, thread id, parent pid]``, after ``delay`` seconds."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def load(self, source):
        time.sleep(self.delay)
        return np.array([[os.getpid(), threading.get_ident(), os.getppid()]], dtype=np.uint64)


# -- fixtures and helpers -----------------------------------------------------------------

RAGGED = [f"{n}:{k}" for k, n in enumerate([3, 0, "none", 1, 7, 0, 2, "none"] * 6)]


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster, set_as_default=False) as client:
        yield client


def build(path, sources, schema=None, cls=h5m.TypedFile, **kwargs):
    kwargs.setdefault("progress", False)
    return cls.create(path, sources, schema=schema, **kwargs)


def snapshot(path) -> dict:
    """Every dataset of a file read with plain h5py: dtype, shape, chunks and its bytes."""
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            if h5py.check_string_dtype(obj.dtype):
                data = obj.asstr()[()].tolist()
            else:
                data = obj[()].tobytes()
            out[name] = (obj.dtype.str, obj.shape, obj.chunks, data)

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return out


def plain_ids(path) -> list[str]:
    with h5py.File(path, "r") as f:
        return f["__src__/id"].asstr()[()].tolist()


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


SCHEDULERS = ["sync", "threads", "processes", "client"]


def scheduler_of(name, client):
    return client if name == "client" else name


def children() -> set[int]:
    """This process's descendants, but a fork server: it stays for the next build."""
    return {p.pid for p in psutil.Process().children(recursive=True) if not fork_server(p)}


def fork_server(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "multiprocessing.forkserver" in " ".join(process.cmdline())
    return False


# -- equality across schedulers and worker counts ----------------------------------------


def test_ragged_file_reads_back(tmp_path):
    file = build(tmp_path / "r.h5", RAGGED, cls=RaggedFile, scheduler="sync")
    with_data = [s for s in RAGGED if not s.startswith("none")]
    assert plain_ids(file.filename) == with_data
    x = file.get_proxy("data/x")
    for id in with_data:
        n, k = (int(v) for v in id.split(":"))
        np.testing.assert_array_equal(x.get(id), Ragged().load(id))
        np.testing.assert_array_equal(file.get_proxy("data/twice").get(id), 2 * Ragged().load(id))
        assert file.label.get(id).tolist() == [k % 5]
        assert (file.get_proxy("data/kind").get(id) is None) == (n == 0)
    zero = x.refs[with_data.index("0:1")]
    assert zero.start == zero.stop  # a zero-row result is an empty region, not an absence
    with h5py.File(file.filename, "r") as f:
        assert f["data/kind/refs"][with_data.index("0:1")].tolist() == [-1, -1]
        assert f["data/x"].attrs["n_rows"] == f["data/x/values"].shape[0] == 13 * 6
        assert f.attrs["n_ids_after_create"] == len(with_data)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(scheduler="threads", n_workers=1),
        dict(scheduler="threads", n_workers=3),
        dict(scheduler="processes", n_workers=2),
        dict(parallelism="none"),
        "client",
        "active client",
    ],
    ids=["threads-1", "threads-3", "processes-2", "parallelism-none", "client", "active"],
)
def test_files_are_byte_identical_whatever_the_scheduler(tmp_path, client, cluster, kwargs):
    reference = build(tmp_path / "sync.h5", RAGGED, cls=RaggedFile, scheduler="sync")
    path = tmp_path / "other.h5"
    if kwargs == "client":
        file = build(path, RAGGED, cls=RaggedFile, scheduler=client)
    elif kwargs == "active client":
        with distributed.Client(cluster):
            file = build(path, RAGGED, cls=RaggedFile)
    else:
        file = build(path, RAGGED, cls=RaggedFile, **kwargs)
    expected = snapshot(reference.filename)
    assert set(expected) >= {"__src__/id", "data/x/values", "data/x/refs", "label/refs"}
    assert snapshot(file.filename) == expected
    with h5py.File(file.filename, "r") as f:  # after_create ran once, on every scheduler
        assert f["data/x"].attrs["n_rows"] == 13 * 6
        assert f.attrs["n_ids_after_create"] == len(plain_ids(file.filename))


def test_many_partitions_are_written_in_id_order(tmp_path, client):
    sources = [f"{n}:{k}" for k, n in enumerate(np.random.default_rng(0).integers(0, 9, 700))]
    files = [
        build(tmp_path / "sync.h5", sources, {"x": Ragged()}, scheduler="sync"),
        build(tmp_path / "threads.h5", sources, {"x": Ragged()}, scheduler="threads", n_workers=4),
        build(tmp_path / "client.h5", sources, {"x": Ragged()}, scheduler=client),
    ]
    assert plain_ids(files[0].filename) == sources
    assert snapshot(files[1].filename) == snapshot(files[0].filename)
    assert snapshot(files[2].filename) == snapshot(files[0].filename)


def test_a_cluster_gets_the_ids_in_bulks_not_all_at_once(tmp_path, client, monkeypatch):
    """Partitions below, at and above the bulk size: each names its ids within its bulk."""
    monkeypatch.setattr(engine, "SHARED_BYTES", 50 * (8 + 5))  # ~50 ids like "3:123"
    sharer, bulks = engine._sharer, []

    def counting(client):
        share = sharer(client)

        def counted(obj):
            if isinstance(obj, engine.IdTable):
                bulks.append(obj[0 : len(obj)])
            return share(obj)

        return counted

    monkeypatch.setattr(engine, "_sharer", counting)
    sources = [f"{n}:{k}" for k, n in enumerate(np.random.default_rng(1).integers(0, 9, 700))]
    reference = build(tmp_path / "sync.h5", sources, {"x": Ragged()}, scheduler="sync")
    build(tmp_path / "client.h5", sources, {"x": Ragged()}, scheduler=client)
    assert snapshot(tmp_path / "client.h5") == snapshot(reference.filename)
    assert len(bulks) > 2 and max(len(b) for b in bulks) < len(sources)
    assert [id for bulk in bulks for id in bulk][: len(bulks[0])] == sources[: len(bulks[0])]
    assert set(sources) <= {id for bulk in bulks for id in bulk}


# -- where loads run ----------------------------------------------------------------------


def ran_in(file) -> tuple[set[int], set[int]]:
    where = file.get_proxy("where")[:]
    return set(where[:, 0].tolist()), set(where[:, 1].tolist())


#: sources that load for 3 s in all: an embedded cluster starts meanwhile, even on a slow machine
SLOW = dict(sources=[str(i) for i in range(600)], schema={"where": Where(delay=0.005)})


@pytest.mark.parametrize(
    "how",
    [dict(parallelism="none"), dict(scheduler="sync"), dict(scheduler="single-threaded")],
)
def test_sync_runs_in_the_calling_thread(tmp_path, how):
    pids, threads = ran_in(
        build(tmp_path / "w.h5", [str(i) for i in range(20)], {"where": Where()}, **how)
    )
    assert pids == {os.getpid()} and threads == {threading.get_ident()}


@pytest.mark.parametrize("how", [dict(parallelism="threads"), dict(scheduler="threads")])
def test_threads_run_in_this_process_off_the_calling_thread(tmp_path, how):
    file = build(tmp_path / "w.h5", [str(i) for i in range(20)], {"where": Where()}, **how)
    pids, threads = ran_in(file)
    assert pids == {os.getpid()} and threading.get_ident() not in threads


@pytest.mark.parametrize("how", [dict(parallelism="mp"), dict(scheduler="processes")])
def test_processes_run_in_other_processes(tmp_path, how):
    file = build(
        tmp_path / "w.h5", [str(i) for i in range(20)], {"where": Where()}, n_workers=2, **how
    )
    pids, _ = ran_in(file)
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert pids.isdisjoint(children())  # the pool is shut down


def test_a_client_runs_loads_on_its_workers(tmp_path, client, cluster):
    workers = set(client.run(os.getpid).values())
    pids, _ = ran_in(
        build(tmp_path / "a.h5", [str(i) for i in range(40)], {"where": Where()}, scheduler=client)
    )
    assert pids <= workers
    with distributed.Client(cluster):  # the active client is used when scheduler=None
        pids, _ = ran_in(build(tmp_path / "b.h5", [str(i) for i in range(40)], {"where": Where()}))
    assert pids <= workers
    pids, _ = ran_in(
        build(
            tmp_path / "c.h5",
            [str(i) for i in range(40)],
            {"where": Where()},
            scheduler=cluster.scheduler_address,
        )
    )
    assert pids <= workers


@pytest.mark.parametrize("name", ["processes", "client"])
def test_features_defined_in_a_function_run_in_worker_processes(tmp_path, client, name):
    offset = 10

    class Local(h5m.Feature):  # not importable by workers: sent by value, as dask does
        def load(self, source):
            return np.array([int(source) + offset, os.getpid()])

    sources = [str(i) for i in range(8)]
    file = build(
        tmp_path / "l.h5",
        sources,
        {"x": Local()},
        scheduler=scheduler_of(name, client),
        n_workers=2,
    )
    values = file.x[:].reshape(-1, 2)
    assert values[:, 0].tolist() == list(range(10, 18))
    assert os.getpid() not in values[:, 1]


def test_embedded_cluster_shuts_down_after_success_and_after_an_error(tmp_path, cluster):
    before = children()  # the module's cluster workers are running: they stay
    pids, _ = ran_in(build(tmp_path / "e.h5", **SLOW, n_workers=2))
    workers = pids - {os.getpid()}
    assert 1 <= len(workers) <= 2 and workers.isdisjoint(before)
    assert children() <= before, "the embedded cluster left processes behind"
    with pytest.raises(LoadError, match="bad-7"):
        build(
            tmp_path / "f.h5",
            [f"ok-{i}" for i in range(7)] + ["bad-7"],
            {"f": Flaky()},
            n_workers=2,
        )
    assert children() <= before, "the embedded cluster left processes behind after an error"


def test_this_process_loads_the_first_sources_while_the_embedded_cluster_starts(tmp_path):
    where = build(tmp_path / "s.h5", **SLOW, n_workers=2).get_proxy("where")[:]
    here = where[:, 0] == os.getpid()
    assert here[0], "the first source waited for the cluster"
    assert not here.all(), "the cluster never took over"
    assert here[: here.sum()].all(), "this process loaded more than the first sources"
    assert threading.get_ident() not in where[here, 1], "the loads held up the writer's thread"


def test_a_partition_not_begun_when_the_cluster_is_up_is_handed_over(monkeypatch):
    class LateLane(ThreadPoolExecutor):  # each task waits 0.3 s behind another
        def submit(self, fn, /, *args, **kwargs):
            super().submit(time.sleep, 0.3)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(engine, "ThreadPoolExecutor", LateLane)
    starting: Future = Future()
    threading.Timer(0.05, starting.set_result, [None]).start()
    parts = engine.Partitions(["a", "b", "c"], most=3, first=1)
    steps = engine._while_starting(starting, parts, iter(parts), {"w": Where()}, None, None)
    with pytest.raises(StopIteration) as stop:
        next(steps)
    assert stop.value.value.result(timeout=10).ids == ["a"]  # not cancelled


def test_the_embedded_cluster_writes_what_sync_writes(tmp_path):
    sources = [f"{n}:{k}" for k, n in enumerate(np.random.default_rng(1).integers(0, 9, 600))]
    schema = {"x": Ragged(), "where": Where(delay=0.005)}
    files = [build(tmp_path / f"{s}.h5", sources, schema, scheduler=s) for s in ("sync", None)]
    here = files[1].get_proxy("where")[:, 0] == os.getpid()
    assert here.any() and not here.all()  # both this process and the workers loaded some
    a, b = (snapshot(f.filename) for f in files)
    for name in ("__src__/id", "x/values", "x/refs", "where/refs"):
        assert a[name] == b[name], name


@pytest.mark.skipif(
    sys.platform == "darwin" or "forkserver" not in multiprocessing.get_all_start_methods(),
    reason="the embedded cluster uses a fork server only where the platform has a safe one",
)
def test_embedded_cluster_forks_its_workers_from_one_fork_server_that_stays(tmp_path):
    parents = set()
    for name in "ab":
        where = build(tmp_path / f"{name}.h5", **SLOW).get_proxy("where")[:]
        parents |= set(where[where[:, 0] != os.getpid(), 2].tolist())
    assert len(parents) == 1, "the second build started another fork server"
    server = psutil.Process(parents.pop())
    assert fork_server(server) and server.ppid() == os.getpid()


def test_a_start_method_set_in_dask_config_is_kept():
    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}):
        assert engine._worker_start_method() == "fork"


INTERRUPTED = """
import sys, time
from pathlib import Path
import h5py, numpy as np, psutil
import h5dask as h5m

class Sleepy(h5m.Feature):
    def load(self, source):
        Path(sys.argv[2]).touch()
        time.sleep(0.01)
        return np.array([int(source)])

if __name__ == "__main__":
    try:
        h5m.TypedFile.create(sys.argv[1], [str(i) for i in range(3000)], schema={"x": Sleepy()},
                             n_workers=2, progress=False)
    except KeyboardInterrupt:
        left = [p.cmdline() for p in psutil.Process().children(recursive=True)]
        helpers = ("resource_tracker", "multiprocessing.forkserver")  # they stay, by design
        left = [c for c in left if not any(h in " ".join(c) for h in helpers)]
        with h5py.File(sys.argv[1], "r") as f:  # the sources committed are the first ones
            ids = f["__src__/id"].asstr()[:].tolist()
            prefix = ids == [str(i) for i in range(len(ids))] and len(ids) < 3000
            print("interrupted", left, prefix, flush=True)
"""


def test_ctrl_c_stops_the_embedded_cluster(tmp_path):
    script, started = tmp_path / "build.py", tmp_path / "started"
    script.write_text(INTERRUPTED)
    args = [sys.executable, str(script), str(tmp_path / "i.h5"), str(started)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert out.strip() == "interrupted [] True"


# -- sources: local directories, globs, memory:// and http:// -----------------------------


def test_local_directories_and_globs(tmp_path, client):
    files = {
        "imgs/b.bin": b"bb",
        "imgs/sub/a.bin": b"a" * 5,
        "imgs/empty.bin": b"",
        "imgs/.hidden.bin": b"h",
        "imgs/.cache/c.bin": b"c",
        "more/x.bin": b"xyz",
        "more/y.txt": b"yy",
    }
    write_files(tmp_path, files)
    sources = [str(tmp_path / "imgs"), str(tmp_path / "more" / "*.bin")]
    ids = [
        str(tmp_path / n) for n in ["imgs/b.bin", "imgs/empty.bin", "imgs/sub/a.bin", "more/x.bin"]
    ]
    built = [
        build(tmp_path / "sync.h5", sources, {"payload": Payload()}, scheduler="sync"),
        build(tmp_path / "dist.h5", sources, {"payload": Payload()}, scheduler=client),
    ]
    for file in built:
        assert plain_ids(file.filename) == ids
        for id in ids:
            assert file.payload.get(id).tobytes() == Path(id).read_bytes()
    assert snapshot(built[1].filename) == snapshot(built[0].filename)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_memory_urls(tmp_path, memory_fs, scheduler):
    for name, data in {
        "a.bin": b"aa",
        "sub/b.bin": b"b" * 9,
        ".hidden.bin": b"h",
        ".git/c.bin": b"c",
    }.items():
        memory_fs.pipe(f"memory://bucket/imgs/{name}", data)
    memory_fs.pipe("memory://bucket/other/z.bin", b"zz")
    memory_fs.pipe("memory://bucket/other/z.txt", b"no")
    sources = ["memory://bucket/imgs/", "memory://bucket/other/*.bin"]
    file = build(tmp_path / "m.h5", sources, {"payload": Payload()}, scheduler=scheduler)
    ids = [
        "memory://bucket/imgs/a.bin",
        "memory://bucket/imgs/sub/b.bin",
        "memory://bucket/other/z.bin",
    ]
    assert plain_ids(file.filename) == ids
    assert [file.payload.get(i).tobytes() for i in ids] == [b"aa", b"b" * 9, b"zz"]


def test_memory_urls_load_in_this_process_or_are_refused_up_front(tmp_path, memory_fs, client):
    """The memory filesystem lives in this process: the default engine loads such sources in
    threads (its cluster's workers read nothing: 20,000 failed after 6,983 loaded here while
    it started); schedulers of other processes are refused before the file is touched."""
    sources = [f"memory://bucket/{i:05d}.bin" for i in range(400)]
    for i, source in enumerate(sources):
        memory_fs.pipe(source, str(i).encode())
    slow = {"payload": Payload(), "wait": Slow(0.01)}  # 4 s: longer than the cluster's start
    file = build(tmp_path / "m.h5", sources, slow)
    assert plain_ids(file.filename) == sources
    assert file.payload.get(sources[-1]).tobytes() == b"399"
    mixed = ["run-1", *sources]
    for scheduler in ("processes", client):
        path = tmp_path / "refused.h5"
        with pytest.raises(SourceError, match=r"source 'memory://bucket/00000.bin' .* memory"):
            build(path, mixed, {"payload": Payload()}, scheduler=scheduler)
        assert not path.exists()


def test_http_urls_on_threads_and_on_the_cluster(tmp_path, http_server, client):
    write_files(
        http_server.root, {"d/a.bin": b"aaa", "d/s/b.bin": b"b", "d/.h.bin": b"h", "e.bin": b"ee"}
    )
    sources = [f"{http_server.url}/d/", f"{http_server.url}/e.bin"]
    ids = [f"{http_server.url}/d/a.bin", f"{http_server.url}/d/s/b.bin", f"{http_server.url}/e.bin"]
    threads = build(tmp_path / "t.h5", sources, {"payload": Payload()}, scheduler="threads")
    dist = build(tmp_path / "d.h5", sources, {"payload": Payload()}, scheduler=client)
    assert plain_ids(threads.filename) == ids
    assert [dist.payload.get(i).tobytes() for i in ids] == [b"aaa", b"b", b"ee"]
    assert snapshot(dist.filename) == snapshot(threads.filename)


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_failing_load_stops_the_build_keeping_what_came_before(tmp_path, client, name):
    sources = [f"ok-{i}" for i in range(25)] + ["bad-25"] + [f"ok-{i}" for i in range(26, 40)]
    path = tmp_path / "f.h5"
    with pytest.raises(LoadError) as info:
        build(path, sources, {"f": Flaky()}, scheduler=scheduler_of(name, client), n_workers=2)
    error = info.value
    assert (error.source, error.feature) == ("bad-25", "f")
    assert "'bad-25'" in str(error) and "'f'" in str(error) and "cannot parse bad-25" in str(error)
    assert isinstance(error.__cause__, ValueError)
    assert str(error.__cause__) == "cannot parse bad-25"
    assert error.__cause__.__traceback__ is not None  # the original traceback is chained
    assert plain_ids(path) == sources[:25]
    file = h5m.TypedFile(path)
    assert [file.f.get(i).tolist() for i in sources[:25]] == [[len(s)] for s in sources[:25]]


@pytest.mark.parametrize("name", ["sync", "processes", "client"])
def test_an_exception_that_cannot_pickle_still_names_source_and_feature(tmp_path, client, name):
    sources = ["ok-0", "ok-1", "lock-2", "ok-3"]
    with pytest.raises(LoadError) as info:
        build(
            tmp_path / "l.h5",
            sources,
            {"f": Flaky()},
            scheduler=scheduler_of(name, client),
            n_workers=2,
        )
    assert (info.value.source, info.value.feature) == ("lock-2", "f")
    assert "LockedError: stuck on lock-2" in str(info.value)
    assert "stuck on lock-2" in str(info.value.__cause__)
    assert plain_ids(tmp_path / "l.h5") == ["ok-0", "ok-1"]


@pytest.mark.parametrize("name", ["threads", "client"])
def test_a_missing_file_and_an_unreachable_url(tmp_path, client, dead_url, name):
    write_files(tmp_path, {"a.bin": b"a"})
    missing = str(tmp_path / "missing.bin")
    with pytest.raises(LoadError) as info:
        build(
            tmp_path / "m.h5",
            [str(tmp_path / "a.bin"), missing],
            {"payload": Payload()},
            scheduler=scheduler_of(name, client),
        )
    assert (info.value.source, info.value.feature) == (missing, "payload")
    assert "missing.bin" in str(info.value.__cause__)
    url = f"{dead_url}/x.bin"
    with pytest.raises(LoadError) as info:
        build(
            tmp_path / "u.h5",
            [str(tmp_path / "a.bin"), url],
            {"payload": Payload()},
            scheduler=scheduler_of(name, client),
        )
    assert (info.value.source, info.value.feature) == (url, "payload")
    assert url in str(info.value) and info.value.__cause__ is not None
    assert plain_ids(tmp_path / "u.h5") == [str(tmp_path / "a.bin")]


@pytest.mark.parametrize("name", ["sync", "processes", "client"])
def test_shape_and_dtype_mismatches_name_the_later_source(tmp_path, client, name):
    scheduler = scheduler_of(name, client)
    good = [f"s{i}-3-float32" for i in range(30)]
    with pytest.raises(ConcatError) as info:
        build(
            tmp_path / "s.h5",
            good + ["late-4-float32"],
            {"x": Shaped()},
            scheduler=scheduler,
            n_workers=2,
        )
    assert (info.value.source, info.value.feature) == ("late-4-float32", "x")
    assert "(2, 4)" in str(info.value) and "(3,)" in str(info.value)
    assert plain_ids(tmp_path / "s.h5") == good
    with pytest.raises(ConcatError) as info:
        build(
            tmp_path / "d.h5",
            ["a-3-int32", "b-3-int16", "c-3-float64"],
            {"x": Shaped()},
            scheduler=scheduler,
            n_workers=2,
        )
    assert (info.value.source, info.value.feature) == ("c-3-float64", "x")
    assert "float64" in str(info.value) and "int32" in str(info.value)
    with h5py.File(tmp_path / "d.h5", "r") as f:  # the safe cast of int16 was kept
        assert f["__src__/id"].shape == (2,) and f["x/values"].dtype == np.int32


@pytest.mark.parametrize("name", ["threads", "client"])
def test_skip_records_every_failure_and_finishes(tmp_path, client, name):
    write_files(tmp_path, {"good.bin": b"good", "bad.bin": b"bad!", "also.bin": b"a"})
    good, bad, also = (str(tmp_path / n) for n in ["good.bin", "bad.bin", "also.bin"])
    missing = str(tmp_path / "missing.bin")
    sources = ["p-3-float32", good, bad, missing, "q-2-float32", also, "r-3-float32"]
    schema = {"payload": Payload(), "shape": h5m.Group(x=Shaped())}
    file = build(
        tmp_path / "k.h5", sources, schema, scheduler=scheduler_of(name, client), on_error="skip"
    )
    assert plain_ids(file.filename) == ["p-3-float32", good, also, "r-3-float32"]
    assert file.payload.get(also).tobytes() == b"a"
    errors = file.errors
    assert [(e.source, e.feature) for e in errors] == [
        (bad, "payload"),
        (missing, "payload"),
        ("q-2-float32", "shape/x"),
    ]
    assert "ValueError: corrupt payload" in errors[0].message
    assert "missing.bin" in errors[1].message and "(2, 2)" in errors[2].message
    with h5py.File(file.filename, "r") as f:
        table = [
            f[f"__errors__/{c}"].asstr()[()].tolist() for c in ("source", "feature", "message")
        ]
    assert [tuple(row) for row in zip(*table, strict=True)] == [
        (e.source, e.feature, e.message) for e in errors
    ]


@pytest.mark.parametrize("name", ["sync", "client"])
def test_resume_after_a_failure_skips_committed_ids(tmp_path, client, name):
    names = [f"{i:02d}.bin" for i in range(12)]
    write_files(tmp_path / "src", {n: bytes([i]) * (i + 1) for i, n in enumerate(names)})
    (tmp_path / "src" / "07.bin").write_bytes(b"bad file")
    path, scheduler = tmp_path / "r.h5", scheduler_of(name, client)
    with pytest.raises(LoadError, match="07.bin"):
        build(path, tmp_path / "src", {"payload": Payload()}, scheduler=scheduler, n_workers=2)
    ids = [str(tmp_path / "src" / n) for n in names]
    assert plain_ids(path) == ids[:7]
    assert h5m.TypedFile(path).payload.get(ids[6]).tobytes() == bytes([6]) * 7
    (tmp_path / "src" / "07.bin").write_bytes(bytes([7]) * 8)
    log = tmp_path / "log"  # which sources the resumed build loads
    log.mkdir()
    schema = {"payload": Payload(str(log))}
    file = build(path, tmp_path / "src", schema, mode="a", scheduler=scheduler, n_workers=2)
    loaded = sorted(entry.name.rsplit("-", 1)[0] for entry in log.iterdir())
    assert loaded == sorted(i.replace("/", "_").replace(":", "_") for i in ids[7:])
    assert plain_ids(path) == ids
    whole = build(tmp_path / "whole.h5", tmp_path / "src", {"payload": Payload()}, scheduler="sync")
    assert [file.payload.get(i).tobytes() for i in ids] == [
        whole.payload.get(i).tobytes() for i in ids
    ]
    with h5py.File(path, "r") as f, h5py.File(whole.filename, "r") as g:
        assert f["payload/refs"][()].tolist() == g["payload/refs"][()].tolist()
        assert f["payload/values"][()].tobytes() == g["payload/values"][()].tobytes()


# -- invalid arguments ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(scheduler="bogus"), "scheduler"),
        (dict(scheduler=3), "scheduler"),
        (dict(parallelism="gpu"), "parallelism"),
        (dict(parallelism="mp", scheduler="sync"), "not both"),
        (dict(scheduler="tcp:/nowhere"), "scheduler"),
        (dict(on_error="ignore"), "on_error"),
        (dict(mode="r"), "mode"),
    ],
)
def test_invalid_values_are_value_errors_that_leave_the_file_alone(tmp_path, kwargs, match):
    path = tmp_path / "keep.h5"
    build(path, ["1:1", "2:2"], {"x": Ragged()}, scheduler="sync")
    before = snapshot(path)
    with pytest.raises(ValueError, match=match):
        build(path, ["3:3"], {"x": Ragged()}, **kwargs)
    assert snapshot(path) == before


def test_empty_schemas_are_schema_errors(tmp_path):
    with pytest.raises(SchemaError, match="empty"):
        build(tmp_path / "e.h5", ["1:1"], {}, scheduler="sync")

    class Nothing(h5m.TypedFile):
        pass

    with pytest.raises(SchemaError, match="Nothing"):
        build(tmp_path / "n.h5", ["1:1"], cls=Nothing, scheduler="sync")
    with pytest.raises(SchemaError, match="load"):
        build(tmp_path / "a.h5", ["1:1"], {"log": h5m.Array()}, scheduler="sync")


# -- the bounded window ---------------------------------------------------------------------


def slow(fn):
    def run(*args):
        time.sleep(random.uniform(0, 0.01))
        return fn(*args)

    return run


def test_the_window_bounds_partitions_in_flight_and_keeps_order():
    parts = [[f"{n}:{k}" for k in range(i * 5, i * 5 + 5) for n in [k % 3]] for i in range(40)]
    submitted = []
    with ThreadPoolExecutor(4) as pool:

        def submit(fn, *args):
            submitted.append(args[0])
            return pool.submit(slow(fn), *args)

        window = 3
        seen = []
        calls = ((engine.load_partition, part, {"x": Ragged()}, None) for part in parts)
        for k, packed in enumerate(engine._in_order(submit, calls, window)):
            assert len(submitted) <= window + k + 1  # at most `window` partitions in flight
            assert packed.ids == parts[k]  # in order, whatever finished first
            seen.extend(id for id, _ in packed)
    assert len(submitted) == len(parts)
    assert seen == [id for part in parts for id in part]


def test_closing_the_window_cancels_what_has_not_started():
    parts = [[str(i)] for i in range(10)]
    futures = []
    with ThreadPoolExecutor(1) as pool:

        def submit(fn, *args):
            futures.append(pool.submit(slow(fn), *args))
            return futures[-1]

        calls = ((engine.load_partition, part, {"where": Where()}, None) for part in parts)
        loads = engine._in_order(submit, calls, window=4)
        next(loads)
        loads.close()
        assert len(futures) == 5
        assert sum(f.cancelled() for f in futures) >= 3


def test_resume_after_skipping_forgets_failures_that_now_load(tmp_path):
    write_files(tmp_path / "src", {"a.bin": b"a", "b.bin": b"bad b", "c.bin": b"bad c"})
    path = tmp_path / "s.h5"
    file = build(path, tmp_path / "src", {"payload": Payload()}, scheduler="sync", on_error="skip")
    assert [e.source for e in file.errors] == [
        str(tmp_path / "src" / n) for n in ["b.bin", "c.bin"]
    ]
    (tmp_path / "src" / "b.bin").write_bytes(b"b")
    file = build(path, tmp_path / "src", {"payload": Payload()}, mode="a", on_error="skip")
    assert plain_ids(path) == [str(tmp_path / "src" / n) for n in ["a.bin", "b.bin"]]
    assert [(e.source, e.feature) for e in file.errors] == [
        (str(tmp_path / "src" / "c.bin"), "payload")
    ]
    with h5py.File(path, "r") as f:
        assert f["__errors__/source"].shape == (1,)


def test_partitions_shrink_to_a_byte_budget_once_results_are_seen():
    ids = [str(i) for i in range(300)]
    parts = engine.Partitions(ids, most=512)
    sizes = []
    for part in parts:
        sizes.append(len(part))
        parts.observe(engine.load_partition(ids[part.start : part.stop], {"x": Filler(1 << 20)}))
    assert sizes[0] == 1  # sized blind: one id
    assert set(sizes[1:-1]) == {engine.PARTITION_BYTES >> 20}
    assert sum(sizes) == len(ids)
    many = [str(i) for i in range(2000)]
    small = engine.Partitions(many, most=512)
    sizes = []
    for part in small:
        sizes.append(len(part))
        small.observe(engine.load_partition(many[part.start : part.stop], {"x": Filler(64)}))
    assert sizes[0] == 1 and max(sizes) == 512  # small results: no byte budget binds


class Slow(h5m.Feature):
    """A tiny result after ``seconds`` of work."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def load(self, source):
        time.sleep(self.seconds)
        return np.zeros(1)


def test_partitions_shrink_to_a_time_budget_when_loads_are_slow():
    ids = [str(i) for i in range(80)]
    parts = engine.Partitions(ids, most=512, seconds=0.05)
    sizes = []
    for part in parts:
        sizes.append(len(part))
        packed = engine.load_partition(ids[part.start : part.stop], {"x": Slow(0.005)})
        assert packed.seconds >= 0.005 * len(part)
        parts.observe(packed)
    assert sizes[0] == 1  # sized blind: one id
    assert 1 <= max(sizes[1:]) <= 10  # 0.05 s of 5 ms loads
    assert sum(sizes) == len(ids)


def test_memory_in_flight_is_bounded_by_the_window_not_the_number_of_sources():
    schema, workers = {"x": Filler(256 << 10)}, 2
    window = 2 * workers + 2
    tracemalloc.start()
    try:
        n = sum(
            len(packed.ids)
            for packed in engine.run_loads(
                [str(i) for i in range(3000)], schema, workers, "threads", False
            )
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 3000  # 750 MiB went through
    assert peak < (window + 2 * workers) * engine.PARTITION_BYTES


@pytest.mark.parametrize("where", ["client", "threads"])
def test_freed_memory_goes_back_after_each_partition_from_other_processes(
    tmp_path, client, monkeypatch, where
):
    trims = []

    def counted():
        trims.append(1)
        real()

    real = engine._release_free_memory
    monkeypatch.setattr(engine, "_release_free_memory", counted)
    sources = [str(i) for i in range(3000)]
    scheduler = client if where == "client" else where
    with build(tmp_path / "x.h5", sources, {"x": Filler(4 << 10)}, scheduler=scheduler) as f:
        assert len(f) == 3000
    if where == "client":  # one a partition, of at most ceil(3000 / 16) = 188 ids
        assert len(trims) >= 16
    else:  # threads: their blocks reuse the freed memory, which a trim would give away
        assert trims == []
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert engine._malloc_trim() is not None  # glibc: the trim is real, not a no-op


class Wide(h5m.Feature):
    """Rows of 16 KiB, so that a partition's results go through shared-memory files."""

    def load(self, source):
        n = int(source)
        return np.full((n % 5, 4096), n, dtype=np.float32)


@pytest.mark.parametrize("where", ["processes", "client"])
def test_large_results_cross_processes_through_files_and_leave_none(tmp_path, client, where):
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    mine = f"h5dask-{os.getpid()}-*"  # the spill folders of this process's builds
    before = {p.name for p in shm.glob(mine)}
    sources = [str(n) for n in range(300)]  # 2.4 MB: partitions above engine.SPILL_BYTES
    reference = build(tmp_path / "sync.h5", sources, {"x": Wide()}, scheduler="sync")
    scheduler = client if where == "client" else where
    build(tmp_path / "other.h5", sources, {"x": Wide()}, scheduler=scheduler, n_workers=2)
    assert snapshot(tmp_path / "other.h5") == snapshot(reference.filename)
    assert {p.name for p in shm.glob(mine)} == before
    assert engine._all_local(client.scheduler_info()["workers"])
    assert not engine._all_local({"tcp://10.1.2.3:8786": {}})


def test_features_the_workers_cannot_import_are_a_clear_error(tmp_path, client, monkeypatch):
    (tmp_path / "unshared_features.py").write_text(
        "import numpy as np\nimport h5dask as h5m\n\n"
        "class Unshared(h5m.Feature):\n    def load(self, source):\n        return np.ones(2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # importable here, not on the workers
    module = __import__("unshared_features")
    start = time.monotonic()
    with pytest.raises(h5m.errors.SchemaError, match="unshared_features") as info:
        build(tmp_path / "u.h5", ["1", "2"], {"x": module.Unshared()}, scheduler=client)
    assert "importable on the workers" in str(info.value)
    assert time.monotonic() - start < 30  # an error, not workers dying over and over
    assert plain_ids(tmp_path / "u.h5") == []


def test_id_table_slices_like_the_list_it_packs():
    ids = ["a", "bé", "", "dir/ü 1.png", "x" * 300] * 20
    table = engine.IdTable(ids)
    assert len(table) == len(ids) and table.blob.dtype == np.uint8
    for start, stop in [(0, 5), (2, 3), (3, 3), (7, 100), (99, 100)]:
        assert table[start:stop] == ids[start:stop]


def test_spilled_results_gather_many_arrays_into_one_file(tmp_path):
    """More arrays than one writev takes, empty and non-contiguous ones among them."""
    rng = np.random.default_rng(3)
    arrays = [rng.random((int(rng.integers(0, 4)), 6))[:, ::2] for _ in range(2 * 1024 + 7)]
    spilled = engine.Spilled.write(str(tmp_path), arrays)
    assert spilled.shape == (sum(len(a) for a in arrays), 3)
    np.testing.assert_array_equal(spilled.take(), np.concatenate(arrays))
    assert list(tmp_path.iterdir()) == []  # take() unlinks the file


class ById(h5m.Feature):
    """16 KiB of float32 a source, each holding the source's number."""

    def load(self, source):
        return np.full((1, 4096), float(source), dtype=np.float32)


@contextmanager
def file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail (EFBIG), as they fail on a full /dev/shm (ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_results_the_spill_folder_cannot_take_are_sent_instead(tmp_path):
    ids = [str(i) for i in range(32)]  # 512 KiB of results: past SPILL_BYTES
    expected = np.repeat(np.arange(32, dtype=np.float32), 4096).reshape(32, 4096)
    assert engine.Spilled.write(str(tmp_path / "gone"), [expected]) is None
    full = tmp_path / "full"
    full.mkdir()
    with file_size_limit(100_000):  # the write stops part of the way
        assert engine.Spilled.write(str(full), [expected]) is None
        packed = engine.load_partition(ids, {"x": ById()}, spill=str(full))
    assert list(full.iterdir()) == []  # no partial file is left behind
    assert type(packed.values["x"]) is np.ndarray and packed.dense
    np.testing.assert_array_equal(packed.values["x"], expected)
    assert packed.rows["x"].tolist() == [1] * 32


def test_many_small_results_without_a_spill_folder_are_packed_in_memory_of_their_own():
    """Mapped, their memory goes back to the system when the writer frees them, leaving
    no hole in the heap; results of larger sources, or few bytes in all, use the heap."""

    def memory_of(array: np.ndarray) -> object:
        while isinstance(array.base, np.ndarray):
            array = array.base
        return array.base.obj if isinstance(array.base, memoryview) else array.base

    ids = [str(i) for i in range(128)]
    small = engine.load_partition(ids, {"x": Filler(1024)})  # 128 KiB, 1 KiB a source
    assert isinstance(memory_of(small.values["x"]), mmap.mmap)
    np.testing.assert_array_equal(small.values["x"], np.ones((128, 256), np.float32))
    assert small.rows["x"].tolist() == [1] * 128
    few = engine.load_partition(ids[:32], {"x": Filler(1024)})  # 32 KiB in all
    assert memory_of(few.values["x"]) is None
    large = engine.load_partition(ids[:32], {"x": ById()})  # 16 KiB a source
    assert memory_of(large.values["x"]) is None
    expected = np.repeat(np.arange(32, dtype=np.float32), 4096).reshape(32, 4096)
    np.testing.assert_array_equal(large.values["x"], expected)


def test_without_room_in_shared_memory_results_travel_through_sockets(tmp_path, caplog):
    free = shutil.disk_usage(tempfile.gettempdir()).free
    with caplog.at_level(logging.WARNING, logger="h5dask"):
        with engine._spill_folder(True, free + (1 << 40)) as folder:
            assert folder is None
    assert "MiB free, less than the" in caplog.text and "--shm-size" in caplog.text
    with engine._spill_folder(True, 1 << 20) as folder:  # any machine has a MiB free
        assert folder is not None and os.path.isdir(folder)
    sources = [str(i) for i in range(100)]
    reference = build(tmp_path / "sync.h5", sources, {"x": ById()}, scheduler="sync")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="h5dask"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine, "MIN_SPILL_PARTITION", 1 << 50)  # no /dev/shm is that big
            build(tmp_path / "p.h5", sources, {"x": ById()}, scheduler="processes", n_workers=2)
    assert "send their results through sockets" in caplog.text
    assert snapshot(tmp_path / "p.h5") == snapshot(reference.filename)


def test_partitions_shrink_to_fit_a_small_shared_memory(monkeypatch):
    """As in a Docker container's 64 MiB /dev/shm: half of it holds the partitions in flight."""
    usage = shutil.disk_usage

    def small_shm(path):
        return usage(path)._replace(free=64 << 20) if "h5dask-" in str(path) else usage(path)

    monkeypatch.setattr(engine.shutil, "disk_usage", small_shm)
    ids = [str(i) for i in range(4000)]
    batches = engine.run_loads(ids, {"x": Filler(64 << 10)}, 2, "processes", False)
    sizes = [len(packed.ids) for packed in batches]
    window = 2 * 2 + 2
    assert sum(sizes) == len(ids)
    assert max(sizes[1:]) == (64 << 20) // (2 * window) // (64 << 10)


def test_partitions_of_threads_are_smaller_than_those_sent_between_processes(monkeypatch):
    monkeypatch.setattr(engine, "LOCAL_PARTITION_SECONDS", 60.0)  # only bytes bound them here
    monkeypatch.setattr(engine, "PARTITION_BYTES", 8 << 20)  # below the cap of 250 sources
    ids = [str(i) for i in range(4000)]
    sizes = {}
    for scheduler in ("threads", "processes"):
        batches = engine.run_loads(ids, {"x": Filler(64 << 10)}, 2, scheduler, False)
        sizes[scheduler] = [len(packed.ids) for packed in batches]
        assert sum(sizes[scheduler]) == len(ids)
    assert max(sizes["threads"][1:]) == engine.LOCAL_PARTITION_BYTES // (64 << 10)
    assert max(sizes["processes"][1:]) == engine.PARTITION_BYTES // (64 << 10)
