"""Files written by h5mapper: read read-only, and converted to the h5dask format.

The files are built with plain h5py and region references, laid out as h5mapper
0.3.3's ``crud._add`` lays them out: per feature path a group with ``__arr__``
(the concatenation, chunks of the first array's shape) and ``__ref__`` (one
region reference per id, null where none), the ids in ``/__src__/id`` and the
feature paths, in the order they first appeared, in ``/__src__/ds_keys``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import h5dask as h5m
from h5dask.errors import FileFormatError, H5DaskError, ReadOnlyError
from h5dask.legacy import convert

ROOT = Path(__file__).resolve().parents[1]
UTF8 = h5py.string_dtype(encoding="utf-8")


def append(f: h5py.File, path: str, array: np.ndarray, **kwargs) -> h5py.Dataset:
    """h5mapper's ``_add.array``: create from the first array, then resize and write."""
    if path not in f:
        kwargs.setdefault("dtype", array.dtype)
        f.create_dataset(
            path, shape=(0, *array.shape[1:]), maxshape=(None, *array.shape[1:]),
            chunks=array.shape, **kwargs,
        )  # fmt: skip
    ds = f[path]
    offset = ds.shape[0]
    ds.resize(offset + len(array), axis=0)
    ds[offset:] = array
    return ds


def write_h5mapper(path: Path, sources: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    """A file as h5mapper writes it from ``(id, {feature path: array})`` in order."""
    null = np.array([None], dtype=h5py.regionref_dtype)
    with h5py.File(path, "w") as f:
        f.require_group("__src__")
        refed: list[str] = []
        for i, (src, data) in enumerate(sources):
            refs = {}
            for key, array in data.items():
                kwargs = {"dtype": UTF8} if array.dtype.kind == "U" else {}
                ds = append(
                    f, f"{key}/__arr__", array.astype(object) if kwargs else array, **kwargs
                )
                refs[key] = ds.regionref[ds.shape[0] - len(array) : ds.shape[0]]
            append(f, "__src__/id", np.array([src], dtype=object), dtype=UTF8)
            for key in refs.keys() - set(refed):
                if i > 0:  # earlier ids have no data there
                    append(f, f"{key}/__ref__", np.repeat(null, i + 1), dtype=h5py.regionref_dtype)
                append(f, "__src__/ds_keys", np.array([key], dtype=object), dtype=UTF8)
                refed.append(key)
            for key in refed:
                ref = refs.get(key)
                table = f.get(f"{key}/__ref__")
                if table is None or table.shape[0] <= i:
                    row = np.array([ref], dtype=h5py.regionref_dtype)
                    append(f, f"{key}/__ref__", row, dtype=h5py.regionref_dtype)
                else:
                    table[i] = ref
        if "data" in f:
            f["data"].attrs["sr"] = 22050


class One(h5m.Feature):
    def load(self, source):
        return np.ones(1)


def x_of(k: int) -> np.ndarray:
    return (np.arange(6 * (k % 3 + 1), dtype=np.float32) + 100 * k).reshape(-1, 2)


SOURCES = [
    (f"{k}.exm", {"data/x": x_of(k), "data/label": np.array([k]), "name": np.array([f"n{k}", "é"])})
    for k in range(5)
] + [("train", {"loss": np.linspace(1, 0, 7)})]


@pytest.fixture
def old(tmp_path) -> Path:
    path = tmp_path / "h5mapper.h5"
    write_h5mapper(path, SOURCES)
    return path


def test_reads_an_h5mapper_file(old):
    f = h5m.TypedFile(old)
    assert f.legacy and f.mode == "r"
    assert f.ids.tolist() == [s for s, _ in SOURCES] and len(f) == 6
    assert sorted(f.keys()) == ["data", "loss", "name"]
    assert sorted(f.features) == ["data/label", "data/x", "loss", "name"]
    for k in range(5):
        assert np.array_equal(f.data.x.get(f"{k}.exm"), x_of(k))
        assert f.name.get(k).tolist() == [f"n{k}", "é"]  # by position too
    assert f.data.x.get("train") is None and np.allclose(f.loss.get("train"), np.linspace(1, 0, 7))
    got = f.get("1.exm")
    assert np.array_equal(got["data"]["x"], x_of(1)) and got["data"]["label"].tolist() == [1]
    assert f.data["train"] == {} and np.allclose(f["train"]["loss"], np.linspace(1, 0, 7))
    assert f.data.x.refs[0] == slice(0, 3) and f.data.x.refs[1] == slice(3, 9)
    assert f.data.x.refs[5] is None and f.loss.refs[()].astype(bool).tolist() == [0] * 5 + [1]
    assert f.data.x.refs.array.tolist()[:3] == [[0, 3], [3, 9], [9, 18]]
    everything = np.concatenate([x_of(k) for k in range(5)])
    assert np.array_equal(f.data.x[:], everything) and np.array_equal(
        f.data.x[4:7], everything[4:7]
    )
    assert np.array_equal(f.data.x[f.data.x.refs[2]], x_of(2))
    assert f.data.attrs["sr"] == 22050


def test_h5mapper_file_to_dask_bag_and_loader(old):
    f = h5m.TypedFile(old)
    everything = np.concatenate([x_of(k) for k in range(5)])
    assert np.array_equal(f.data.x.to_dask().compute(scheduler="sync"), everything)
    assert np.array_equal(f.data.x.to_dask("3.exm").compute(scheduler="sync"), x_of(3))
    bag = dict(f.data.x.to_bag().compute(scheduler="sync"))
    assert sorted(bag) == [f"{k}.exm" for k in range(5)]
    assert all(np.array_equal(bag[f"{k}.exm"], x_of(k)) for k in range(5))
    loader = f.serve({"x": h5m.Input(key="data/x", getter=h5m.GetId())}, batch_size=1)
    assert [b["x"][0].numpy().tolist() for b in loader] == [x_of(k).tolist() for k in range(5)]


def test_h5mapper_file_is_read_only(old):
    before = old.read_bytes()
    f = h5m.TypedFile(old)
    with pytest.raises(ReadOnlyError):
        f.data.x[0] = np.zeros(2)
    with pytest.raises(ReadOnlyError):
        f.add("new", {"loss": np.ones(2)})
    for mode in ("r+", "a"):
        with pytest.raises(FileFormatError, match=r"written by h5mapper: .*h5dask convert"):
            h5m.TypedFile(old, mode)
    with pytest.raises(FileFormatError, match="written by h5mapper"):
        f.open("r+")
    with pytest.raises(FileFormatError, match="written by h5mapper"):
        h5m.TypedFile.create(old, ["1"], mode="a", schema={"x": One()}, scheduler="sync")
    assert old.read_bytes() == before  # not relabelled, not touched


def check_converted(new: Path) -> None:
    g = h5m.TypedFile(new)
    assert not g.legacy
    assert g.ids.tolist() == [s for s, _ in SOURCES]
    for src, data in SOURCES:
        for path, array in data.items():
            got = g.get_proxy(path).get(src)
            assert np.array_equal(got, array if array.dtype.kind != "U" else array.tolist()), path
    assert g.data.attrs["sr"] == 22050
    with h5py.File(new, "r") as h:
        assert h.attrs["format"] == "h5dask" and "values" in h["data/x"] and "__arr__" not in h
    g.close()
    with h5m.TypedFile(new, "r+") as w:  # an h5dask file: writable
        w.add("more", {"loss": np.ones(2)})
    assert h5m.TypedFile(new).loss.get("more").tolist() == [1.0, 1.0]


def test_convert_keeps_ids_and_values(old, tmp_path):
    new = tmp_path / "new.h5"
    assert isinstance(convert(old, new), h5m.TypedFile)
    check_converted(new)
    with pytest.raises(FileExistsError, match="exists: convert writes a new file"):
        convert(old, new)
    with pytest.raises(FileFormatError, match="was not written by h5mapper"):
        convert(new, tmp_path / "again.h5")


def test_convert_command(old, tmp_path):
    new = tmp_path / "cli.h5"
    cmd = [sys.executable, "-m", "h5dask", "convert", str(old), str(new)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{new}: 6 ids, 4 features, from {old}"
    check_converted(new)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 1 and "exists: give a new file" in again.stderr


def test_an_id_without_data_is_not_dropped(tmp_path):
    old = tmp_path / "empty-id.h5"
    write_h5mapper(old, [("a", {"x": np.ones(2)}), ("b", {}), ("c", {"x": np.zeros(1)})])
    assert h5m.TypedFile(old).ids.tolist() == ["a", "b", "c"]
    with pytest.raises(H5DaskError, match=r"id 'b' holds no data in any feature"):
        convert(old, tmp_path / "new.h5")


def test_a_region_that_is_not_rows_is_refused(old):
    with h5py.File(old, "r+") as f:
        arr = f["data/x/__arr__"]
        f["data/x/__ref__"][1] = arr.regionref[3:9, 1:]  # one column of the rows: not h5mapper's
    with pytest.raises(FileFormatError, match=r"feature 'data/x'.*id #1 is not a run of rows"):
        h5m.TypedFile(old).data.x.get("1.exm")
