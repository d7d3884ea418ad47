"""Lazy analysis: features as dask arrays and bags, and functions mapped over stored sources."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import dask
import dask.array as da
import h5py
import numpy as np
import pytest
from distributed import Client, LocalCluster

import h5dask as h5m
from h5dask import format as fmt
from h5dask.errors import StaleFileError, UnknownIdError

N_IDS = 120
ROWS_PER_CHUNK = 16


class Recordings(h5m.TypedFile):
    signal = h5m.Array(chunks=(ROWS_PER_CHUNK, 3))
    meta = h5m.Group(label=h5m.Array())


def _arrays(n: int = N_IDS, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"rec-{i:04d}": rng.normal(size=(int(rng.integers(0, 40)), 3)).astype(np.float32)
        for i in range(n)
    }


@pytest.fixture(scope="module")
def cluster() -> Iterator[Client]:
    with (
        LocalCluster(
            n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0"
        ) as lc,
        Client(lc) as client,
    ):
        yield client


@pytest.fixture
def small_chunks() -> Iterator[None]:
    with dask.config.set({"array.chunk-size": "2KiB"}):
        yield


@pytest.fixture
def recordings(tmp_path) -> tuple[Recordings, dict[str, np.ndarray]]:
    arrays = _arrays()
    file = Recordings(tmp_path / "rec.h5", mode="w")
    for i, (id, array) in enumerate(arrays.items()):
        data = {"meta": {"label": np.array([i % 5])}}
        if i % 7 != 3:  # some ids have no signal
            data["signal"] = array
        file.add(id, data)
    file.flush()
    kept = {id: a for i, (id, a) in enumerate(arrays.items()) if i % 7 != 3}
    return file, kept


def _concat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate(list(arrays.values()))


# -- dask arrays ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["sync", "threads", "processes"])
def test_whole_array_equals_numpy(recordings, small_chunks, scheduler):
    file, arrays = recordings
    lazy = file.signal.to_dask()
    assert lazy.shape == file.signal.shape and lazy.dtype == np.float32
    np.testing.assert_array_equal(lazy.compute(scheduler=scheduler), _concat(arrays))


def test_blocks_are_whole_multiples_of_hdf5_chunks(recordings, small_chunks):
    file, _ = recordings
    rows = file.signal.to_dask().chunks[0]
    assert len(rows) > 3
    assert all(n % ROWS_PER_CHUNK == 0 for n in rows[:-1])
    assert file.signal.to_dask(chunks=48).chunks[0][:2] == (48, 48)


def test_default_blocks_follow_dask_chunk_size(recordings):
    file, _ = recordings
    with dask.config.set({"array.chunk-size": "1KiB"}):
        rows = file.signal.to_dask().chunks[0][0]
    assert rows == (1024 // (3 * 4 * ROWS_PER_CHUNK)) * ROWS_PER_CHUNK


def test_graph_holds_no_h5py_object_and_pickles(recordings):
    import cloudpickle

    file, arrays = recordings
    lazy = cloudpickle.loads(cloudpickle.dumps(file.signal.to_dask()))
    graph = dict(lazy.__dask_graph__())
    assert not any(isinstance(v, h5py.HLObject) for v in graph.values())
    np.testing.assert_array_equal(lazy.compute(scheduler="sync"), _concat(arrays))


def test_one_id(recordings, small_chunks):
    file, arrays = recordings
    for id in list(arrays)[:20]:
        np.testing.assert_array_equal(file.signal.to_dask(id).compute(), arrays[id])
    assert file.signal.to_dask(3) is None  # position 3 has no signal
    with pytest.raises(UnknownIdError, match="nope"):
        file.signal.to_dask("nope")


def test_reductions(recordings, small_chunks):
    file, arrays = recordings
    lazy = file.signal.to_dask()
    expected = _concat(arrays)
    np.testing.assert_allclose(lazy.mean(axis=0).compute(), expected.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(lazy.std().compute(), expected.std(), rtol=1e-5)
    assert float(lazy.max().compute()) == expected.max()


def test_file_to_dask(recordings):
    file, arrays = recordings
    lazy = file.to_dask()
    assert set(lazy) == {"signal", "meta"} and set(lazy["meta"]) == {"label"}
    np.testing.assert_array_equal(lazy["signal"].compute(), _concat(arrays))
    np.testing.assert_array_equal(lazy["meta"]["label"].compute(), np.arange(N_IDS) % 5)


def test_on_a_cluster_of_worker_processes(recordings, small_chunks, cluster):
    file, arrays = recordings
    lazy = file.signal.to_dask()
    np.testing.assert_array_equal(cluster.compute(lazy).result(), _concat(arrays))
    first = next(iter(arrays))
    np.testing.assert_array_equal(
        cluster.compute(file.signal.to_dask(first)).result(), arrays[first]
    )
    assert abs(cluster.compute(lazy.sum()).result() - _concat(arrays).sum()) < 1e-2


# -- bags ------------------------------------------------------------------------------------------


def test_bag_of_id_array_pairs(recordings):
    file, arrays = recordings
    bag = file.signal.to_bag(npartitions=4)
    assert bag.npartitions == 4
    pairs = bag.compute(scheduler="sync")
    assert [id for id, _ in pairs] == list(arrays)
    for id, array in pairs:
        np.testing.assert_array_equal(array, arrays[id])


def test_bag_per_id_statistics(recordings, cluster):
    file, arrays = recordings
    bag = file.signal.to_bag(ids_per_partition=25)
    assert bag.npartitions == -(-len(arrays) // 25)
    stats = dict(
        bag.map(lambda kv: (kv[0], len(kv[1]), kv[1].sum())).map(lambda t: (t[0], t[1:])).compute()
    )
    for id, array in arrays.items():
        assert stats[id][0] == len(array)
        assert stats[id][1] == pytest.approx(array.sum(), abs=1e-4)


def test_bag_reads_regions_moved_by_set(recordings):
    file, arrays = recordings
    id = next(iter(arrays))
    longer = np.ones((len(arrays[id]) + 5, 3), dtype=np.float32)
    file.signal.set(id, longer)  # a new length: appended at the end, its ref row moved
    file.flush()
    pairs = dict(file.signal.to_bag(npartitions=2).compute(scheduler="sync"))
    np.testing.assert_array_equal(pairs[id], longer)
    last = list(arrays)[-1]
    np.testing.assert_array_equal(pairs[last], arrays[last])


# -- snapshot semantics --------------------------------------------------------------------------


def test_appended_after_build_computes_the_snapshot(recordings, small_chunks):
    file, arrays = recordings
    lazy = file.signal.to_dask()
    one = file.signal.to_dask(next(iter(arrays)))
    for id, array in _arrays(50, seed=1).items():
        file.add("late-" + id, {"signal": array})
    file.flush()
    assert file.signal.shape[0] > lazy.shape[0]
    np.testing.assert_array_equal(lazy.compute(), _concat(arrays))
    np.testing.assert_array_equal(one.compute(), next(iter(arrays.values())))


def test_moved_file_is_a_clear_error(recordings, tmp_path):
    file, _ = recordings
    lazy = file.signal.to_dask()
    shutil.move(file.filename, tmp_path / "elsewhere.h5")
    with pytest.raises(StaleFileError, match="no longer exists") as info:
        lazy.compute(scheduler="sync")
    assert info.value.feature == "signal" and info.value.filename.endswith("rec.h5")
    assert "signal" in str(info.value) and "rec.h5" in str(info.value)


def _rewrite_values(path: str, data: np.ndarray) -> None:
    with h5py.File(path, "r+") as f:
        del f["signal/values"]
        f["signal"].create_dataset("values", data=data, maxshape=(None, *data.shape[1:]))


def test_changed_shape_is_a_clear_error(recordings):
    file, _ = recordings
    lazy = file.signal.to_dask()
    _rewrite_values(file.filename, np.zeros((lazy.shape[0], 4), dtype=np.float32))
    with pytest.raises(StaleFileError, match=r"rows changed shape from \(3,\) to \(4,\)") as info:
        lazy.compute(scheduler="sync")
    assert info.value.feature == "signal"


def test_shrunk_or_retyped_dataset_is_a_clear_error(recordings):
    file, _ = recordings
    lazy = file.signal.to_dask()
    _rewrite_values(file.filename, np.zeros((10, 3), dtype=np.float32))
    with pytest.raises(StaleFileError, match=f"shrank from {lazy.shape[0]} to 10 rows"):
        lazy.compute(scheduler="sync")
    _rewrite_values(file.filename, np.zeros(lazy.shape, dtype=np.float64))
    with pytest.raises(StaleFileError, match="dtype changed from float32 to float64"):
        lazy.compute(scheduler="sync")


# -- graph size ------------------------------------------------------------------------------------


def _raw_file(path: str, n_ids: int, rows: int) -> h5m.TypedFile:
    """A feature of ``rows`` int8 rows split among ``n_ids`` ids, written with plain h5py."""
    edges = np.linspace(0, rows, n_ids + 1).astype(np.int64)
    with h5py.File(path, "w") as f:
        fmt.init_root(f)
        ids = np.char.add("s", np.arange(n_ids).astype(str)).astype(object)
        f[fmt.IDS].resize((n_ids,))
        f[fmt.IDS][:] = ids
        group = f.create_group("x")
        group.create_dataset("values", data=np.ones((rows, 8), np.int8), chunks=(4096, 8))
        group.create_dataset("refs", data=np.stack([edges[:-1], edges[1:]], axis=1))
    return h5m.TypedFile(path)


def test_graph_size_follows_the_data_not_the_ids(tmp_path):
    many = _raw_file(os.fspath(tmp_path / "many.h5"), 1_000_000, 2_000_000)
    few = _raw_file(os.fspath(tmp_path / "few.h5"), 10, 2_000_000)
    with dask.config.set({"array.chunk-size": "1MiB"}):
        lazy_many, lazy_few = many.x.to_dask(), few.x.to_dask()
        bag_many, bag_few = many.x.to_bag(), few.x.to_bag()
    assert len(lazy_many.__dask_graph__()) == len(lazy_few.__dask_graph__()) < 40
    assert bag_many.npartitions == -(-16_000_000 // 2**20)  # by bytes, not by ids
    assert bag_few.npartitions <= 10  # an id is never split
    assert int(lazy_many.sum().compute()) == 16_000_000
    assert isinstance(lazy_many, da.Array)


# -- map: functions over stored sources ----------------------------------------------------------


def rms(array: np.ndarray) -> np.ndarray:
    if not len(array):
        raise ValueError("no rows")
    return np.sqrt((array.astype(np.float64) ** 2).mean(axis=0, keepdims=True))


def n_rows(array: np.ndarray) -> int:
    return len(array)


def fails_on_long(array: np.ndarray) -> int:
    if len(array) > 30:
        raise ValueError(f"too long: {len(array)} rows")
    return len(array)


def _check_mapped(file: h5m.TypedFile, arrays: dict[str, np.ndarray]) -> None:
    for id, array in arrays.items():
        if len(array):  # rms fails on empty arrays: the whole id is skipped, as in create
            np.testing.assert_allclose(file.stats.rms.get(id), rms(array), rtol=1e-6)
            assert file.stats.n.get(id)[0] == len(array)


@pytest.mark.parametrize("scheduler", ["sync", "threads", "processes"])
def test_map_into_the_same_file(recordings, scheduler):
    file, arrays = recordings
    out = file.signal.map(
        {"stats/rms": rms, "stats/n": n_rows}, scheduler=scheduler, on_error="skip", progress=False
    )
    assert out is file
    _check_mapped(file, arrays)
    assert [f.source for f in file.errors] == [id for id, a in arrays.items() if not len(a)]


def test_map_on_a_cluster_into_another_file(recordings, cluster, tmp_path):
    file, arrays = recordings
    destination = h5m.TypedFile(tmp_path / "stats.h5", mode="w")
    out = file.signal.map(
        {"stats/rms": rms, "stats/n": n_rows}, destination, scheduler=cluster, on_error="skip"
    )
    assert out is destination and os.path.exists(destination.filename)
    _check_mapped(destination, arrays)
    np.testing.assert_array_equal(destination.ids, [id for id, a in arrays.items() if len(a)])
    assert "stats" not in h5m.TypedFile(file.filename).keys()


def test_map_errors_name_source_feature_and_cause(recordings):
    file, arrays = recordings
    long = next(id for id, a in arrays.items() if len(a) > 30)
    with pytest.raises(h5m.errors.LoadError) as info:
        file.signal.map({"n": fails_on_long}, scheduler="sync", progress=False)
    assert info.value.source == long and info.value.feature == "n"
    assert "fails_on_long() on 'signal' raised ValueError: too long" in str(info.value)


def test_map_resumes_and_skips(recordings):
    file, arrays = recordings
    file.signal.map({"n": fails_on_long}, scheduler="sync", on_error="skip", progress=False)
    failed = {f.source for f in file.errors}
    assert failed == {id for id, a in arrays.items() if len(a) > 30}
    stored = len(file.n)
    calls = []

    def count(array: np.ndarray) -> int:
        calls.append(1)
        return len(array)

    file.signal.map({"n": count}, scheduler="sync", progress=False)
    assert len(calls) == len(failed)  # only the ids not stored yet run again
    assert len(file.n) == stored + len(failed)
    assert all(file.n.get(id)[0] == len(a) for id, a in arrays.items())


def test_map_into_its_own_file_without_file_locks_is_a_clear_error(recordings, monkeypatch):
    """As on NFS without its lock daemon: every lockf fails with ENOLCK."""
    import errno
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    file, _ = recordings
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    with pytest.raises(h5m.errors.LoadError, match="destination=") as info:
        file.signal.map({"stats/n2": n_rows}, scheduler="sync", progress=False)
    message = str(info.value)  # the first source, the feature, the file and the cause
    assert "source 'rec-0000', feature 'stats/n2'" in message and file.filename in message
    assert "No locks available" in message
    assert isinstance(info.value.__cause__, h5m.errors.FileFormatError)
