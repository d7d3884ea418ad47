"""Direct reads of uncompressed rows: equal to h5py where they apply, None elsewhere."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from h5dask.direct import read_rows


def written(path, name="x", **kwargs) -> h5py.Dataset:
    """Dataset ``name`` created with ``kwargs``, in ``path`` reopened read-only."""
    with h5py.File(path, "w") as f:
        f.create_dataset(name, **kwargs)
    return h5py.File(path, "r")[name]


@pytest.mark.parametrize(
    "dtype, shape, chunks",
    [
        (np.float32, (1000, 16), (64, 16)),
        (np.int8, (777,), (100,)),
        (np.uint16, (300, 3, 5), (7, 3, 5)),
        (np.float64, (50, 4), None),  # contiguous
        (np.bool_, (130, 2), (16, 2)),
        (np.int64, (5, 2), (1000, 2)),  # one chunk larger than the dataset
    ],
)
def test_rows_equal_h5py_for_any_range(tmp_path, dtype, shape, chunks):
    rng = np.random.default_rng(1)
    data = (rng.random(shape) * 100).astype(dtype)
    maxshape = None if chunks is None else (None, *shape[1:])
    ds = written(tmp_path / "d.h5", data=data, chunks=chunks, maxshape=maxshape)
    n = shape[0]
    ranges = [(0, n), (0, 0), (n, n), (n - 1, n)] + [
        tuple(sorted(rng.integers(0, n + 1, 2))) for _ in range(40)
    ]
    for start, stop in ranges:
        rows = read_rows(ds, int(start), int(stop))
        assert rows is not None
        assert rows.dtype == ds.dtype and rows.shape == ds[start:stop].shape
        np.testing.assert_array_equal(rows, ds[start:stop])
    ds.file.close()


def test_a_dataset_grown_by_appends_reads_its_rows(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        ds = f.create_dataset("x", shape=(0, 4), maxshape=(None, 4), chunks=(10, 4), dtype="f4")
        for k in range(7):
            ds.resize(ds.shape[0] + 13, axis=0)
            ds[-13:] = k
            f.create_dataset(f"between-{k}", data=np.zeros(100))  # chunks apart in the file
    with h5py.File(tmp_path / "d.h5", "r") as f:
        np.testing.assert_array_equal(read_rows(f["x"], 5, 90), f["x"][5:90])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"compression": "gzip"},
        {"shuffle": True},
        {"fletcher32": True},
        {"dtype": ">f4"},  # not the machine's byte order
        {"chunks": (8, 2)},  # chunks across the trailing axis
        {"dtype": h5py.string_dtype()},
        {"dtype": np.dtype([("a", "i4"), ("b", "f8")])},
    ],
)
def test_what_is_not_stored_as_is_is_left_to_h5py(tmp_path, kwargs):
    kwargs = {"chunks": (8, 4), "dtype": "f4", **kwargs}
    with h5py.File(tmp_path / "d.h5", "w") as f:
        ds = f.create_dataset("x", shape=(32, 4), **kwargs)
        ds[:] = np.ones((32, 4)).astype(ds.dtype) if ds.dtype.kind != "O" else "a"
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert read_rows(f["x"], 0, 10) is None


def test_unwritten_chunks_and_bad_ranges_are_left_to_h5py(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("x", shape=(100, 2), chunks=(10, 2), dtype="f4")[0:10] = 1
        f.create_dataset("y", shape=(10,), dtype="f4")  # never written: no storage yet
        f.create_dataset("s", data=3.0)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        ds = f["x"]
        assert read_rows(ds, 0, 10).tolist() == [[1, 1]] * 10
        assert read_rows(ds, 0, 20) is None  # HDF5 fills unwritten chunks
        assert read_rows(ds, 5, 200) is None
        assert read_rows(ds, 8, 4) is None
        assert read_rows(f["y"], 0, 10) is None
        assert read_rows(f["s"], 0, 0) is None


def test_a_file_this_process_writes_is_left_to_h5py(tmp_path):
    """HDF5 may hold a writer's data in its caches: only HDF5 reads see it."""
    with h5py.File(tmp_path / "w.h5", "w") as w:
        w.create_dataset("x", data=np.arange(10.0), chunks=(4,))
        with h5py.File(tmp_path / "w.h5", "r") as r:  # HDF5 shares the writer's file
            assert read_rows(r["x"], 0, 10) is None
            assert r["x"][:].tolist() == list(range(10))


def test_in_memory_files_are_left_to_h5py_user_blocks_are_skipped(tmp_path):
    data = np.arange(40.0).reshape(20, 2)
    with h5py.File(tmp_path / "core.h5", "w", driver="core") as f:
        f.create_dataset("x", data=data, chunks=(4, 2))
    with h5py.File(tmp_path / "core.h5", "r", driver="core") as f:
        assert read_rows(f["x"], 0, 5) is None
    with h5py.File(tmp_path / "ub.h5", "w", userblock_size=512) as f:
        f.create_dataset("x", data=data, chunks=(4, 2))
    with h5py.File(tmp_path / "ub.h5", "r") as f:  # HDF5 gives offsets past the user block
        assert read_rows(f["x"], 3, 17).tolist() == data[3:17].tolist()


def test_external_and_virtual_datasets_are_left_to_h5py(tmp_path):
    raw = tmp_path / "raw.bin"
    np.arange(10, dtype="f4").tofile(raw)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        external = f.create_dataset("e", shape=(10,), dtype="f4", external=[(raw, 0, 40)])
        layout = h5py.VirtualLayout(shape=(10,), dtype="f4")
        layout[:] = h5py.VirtualSource(external)
        f.create_virtual_dataset("v", layout)
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert read_rows(f["e"], 0, 10) is None
        assert read_rows(f["v"], 0, 10) is None
