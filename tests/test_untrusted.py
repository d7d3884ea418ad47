"""Untrusted files read no other file: external raw storage and virtual datasets.

HDF5 reads the data of a dataset with external storage from the files it names (any path,
``/etc/passwd`` too) and that of a virtual dataset from its source files. h5dask refuses
both on every read path with :class:`~h5dask.errors.ExternalFileError` unless the file is
opened with ``allow_external=True`` (``--allow-external`` on the command line).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_hostile import craft, probe, probe_all

import h5dask as h5m
from h5dask.cli import main
from h5dask.errors import ExternalFileError

SECRET = 666.0  # what the other files hold: it must never come back
REFUSED = "its data is read from other files"


@pytest.fixture
def others(tmp_path: Path) -> dict[str, Path]:
    """The other files that crafted files point to: raw bytes and an HDF5 file."""
    np.full(10, SECRET).tofile(tmp_path / "secret.bin")
    np.array([[0, 3], [3, 5], [5, 10]], dtype=np.int64).tofile(tmp_path / "refs.bin")
    (tmp_path / "ids.bin").write_bytes(b"abc")
    (tmp_path / "text.txt").write_text("SECRET password\n")
    with h5py.File(tmp_path / "secret.h5", "w") as f:
        f["data"] = np.full(10, SECRET)
    return {p.name: p for p in tmp_path.iterdir()}


def _external(path: str, name: str, shape: tuple, dtype: str):
    def edit(f):
        del f[path]
        other = str(Path(f.filename).parent / name)
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        f.create_dataset(path, shape=shape, dtype=dtype, external=[(other, 0, size)])

    return edit


def _virtual(f):
    del f["x/values"]
    layout = h5py.VirtualLayout(shape=(10,), dtype="f8")
    layout[:] = h5py.VirtualSource(str(Path(f.filename).parent / "secret.h5"), "data", (10,))
    f.create_virtual_dataset("x/values", layout)


CASES = {
    "values external": _external("x/values", "secret.bin", (10,), "f8"),
    "values virtual": _virtual,
    "refs external": _external("x/refs", "refs.bin", (3, 2), "i8"),
    "ids external": _external("__src__/id", "ids.bin", (3,), "S1"),
}
# the reads of the probe that read the feature's data, refs or ids
READS = ["get", "get by position", "group get", "refs", "ids", "to_dask", "to_bag"]


def test_external_storage_and_virtual_datasets_are_refused_on_every_read_path(tmp_path, others):
    paths = {name: craft(tmp_path / f"{i}.h5", edit=e) for i, (name, e) in enumerate(CASES.items())}
    results = probe_all({k: v for k, v in paths.items() if k != "values external"})
    results["values external"] = probe(paths["values external"], serve=True)
    for name, outcome in results.items():
        assert str(SECRET) not in json.dumps(outcome), name  # nothing of the other files
        assert outcome["open"][0] == "ok", (name, outcome["open"])
        reads = [op for op in READS if not (name == "ids external" and op == "refs")]
        reads += ["serve"] * (name == "values external") + ["slice"] * name.startswith("v")
        for op in reads:
            assert outcome[op][0] == "ExternalFileError", (name, op, outcome[op])
            assert str(paths[name]) in outcome[op][1] and REFUSED in outcome[op][1]
        if name == "ids external":  # the table shows the first ids: refused too
            assert REFUSED in outcome["cli info"][1]
        else:  # described, never read: the table says where the data would come from
            assert outcome["cli info"][0] == "ok", (name, outcome["cli info"])


def test_the_table_and_the_cli_describe_other_files_without_reading_them(tmp_path, others):
    path = craft(tmp_path / "evil.h5", edit=CASES["values external"])
    with h5py.File(path, "a") as f:
        text = str(others["text.txt"])
        f.create_dataset("passwd", shape=(6,), dtype="S1", external=[(text, 0, 6)])
    out, err, rc = _cli("info", str(path))
    assert rc == 0 and "in other files, not read: " + str(others["secret.bin"]) in out
    assert "SECRET" not in out and "666" not in out
    out, err, rc = _cli("ls", str(path))
    assert rc == 0 and str(others["text.txt"]) in out and "666" not in out
    out, err, rc = _cli("show", str(path), "x", "a")
    assert rc == 1 and REFUSED in err and "--allow-external" in err and "666" not in out
    out, err, rc = _cli("show", "--allow-external", str(path), "x", "a")
    assert rc == 0 and "666" in out  # allowed explicitly: read
    file = h5m.TypedFile(path)
    with pytest.raises(ExternalFileError, match="dataset 'passwd'.*text.txt"):
        file.passwd[:4]
    allowed = h5m.TypedFile(path, allow_external=True)
    assert allowed.allow_external and allowed.passwd[:6].tobytes() == b"SECRET"
    assert allowed.x.get("c").tolist() == [SECRET] * 5
    assert allowed.x.to_dask().compute(scheduler="sync").tolist() == [SECRET] * 10
    bag = dict(allowed.x.to_bag().compute(scheduler="sync"))
    assert bag["a"].tolist() == [SECRET] * 3


def test_nothing_is_written_into_other_files(tmp_path, others):
    """A writer appending to a feature stored elsewhere would write the other file."""
    grow = dict(shape=(10,), maxshape=(None,), dtype="f8")

    def edit(f):
        del f["x/values"]
        f.create_dataset(
            "x/values", external=[(str(others["secret.bin"]), 0, h5py.h5f.UNLIMITED)], **grow
        )

    path = craft(tmp_path / "grow.h5", edit=edit)
    before = others["secret.bin"].read_bytes()
    file = h5m.TypedFile(path, mode="r+")
    with pytest.raises(ExternalFileError, match="'x'"):
        file.add("d", {"x": np.zeros(3)})
    with pytest.raises(ExternalFileError):
        file.x[0:2] = np.zeros(2)
    assert others["secret.bin"].read_bytes() == before


def test_the_error_table_stored_elsewhere_is_refused(tmp_path, others):
    def edit(f):
        for field in ("source", "feature", "message"):
            other = str(others["ids.bin"])
            f.create_dataset(
                f"__errors__/{field}", shape=(3,), dtype="S1", external=[(other, 0, 3)]
            )

    path = craft(tmp_path / "errors.h5", edit=edit)
    with pytest.raises(ExternalFileError, match="__errors__"):
        h5m.TypedFile(path).errors  # noqa: B018
    assert len(h5m.TypedFile(path, allow_external=True).errors) == 3
    out, err, rc = _cli("info", str(path))
    assert rc == 1 and REFUSED in err


def test_a_virtual_dataset_of_its_own_file_reads(tmp_path):
    """A virtual dataset whose sources are in its own file opens nothing else: allowed."""

    def edit(f):
        layout = h5py.VirtualLayout(shape=(4,), dtype="f8")
        layout[:] = h5py.VirtualSource(".", "x/values", shape=(10,))[:4]
        f.create_virtual_dataset("v", layout)

    file = h5m.TypedFile(craft(tmp_path / "self.h5", edit=edit))
    assert file.v[:].tolist() == [0.0, 1.0, 2.0, 3.0]


def _cli(*argv: str) -> tuple[str, str, int]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return out.getvalue(), err.getvalue(), rc
