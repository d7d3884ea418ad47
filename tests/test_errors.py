"""Bad input: a named error naming the source, the feature and the cause; the file unchanged."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import h5dask as h5m
from h5dask.errors import (
    ConcatError,
    FileFormatError,
    LoadError,
    ReadOnlyError,
    ResultTypeError,
    SchemaError,
    UnknownIdError,
)


def snapshot(path):
    """Every dataset of the file (ids, values, refs) as bytes, with its shape and dtype."""
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            if h5py.check_string_dtype(obj.dtype):
                data = np.asarray(obj.asstr()[()], dtype=str)
            else:
                data = np.asarray(obj[()])
            out[name] = (obj.shape, str(obj.dtype), data.tobytes())

    with h5py.File(path, "r") as h:
        h.visititems(visit)
    return out


class Logs(h5m.TypedFile):
    x = h5m.Array()
    s = h5m.String()


@pytest.fixture
def logs(tmp_path):
    logs = Logs(tmp_path / "logs.h5", mode="w")
    logs.add("a", {"x": np.zeros((2, 3), np.int32), "s": "text"})
    logs.close()
    return logs


def check(error, *words):
    message = str(error.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_trailing_shape_mismatch(logs):
    before = snapshot(logs.filename)
    with pytest.raises(ConcatError) as error:
        logs.add("b", {"x": np.zeros((2, 4), np.int32)})
    check(error, "'b'", "'x'", "(2, 4)", "(3,)")
    assert error.value.source == "b" and error.value.feature == "x"
    assert isinstance(error.value, ValueError)
    logs.close()
    assert snapshot(logs.filename) == before
    assert "b" not in logs


def test_dtype_mismatch(logs):
    before = snapshot(logs.filename)
    with pytest.raises(ConcatError) as error:
        logs.add("b", {"x": np.zeros((1, 3), np.float64)})
    check(error, "'b'", "'x'", "float64", "int32", "cast")
    with pytest.raises(ConcatError) as error:
        logs.x.add("c", np.array([["1", "2", "3"]]))
    check(error, "'c'", "'x'", "strings")
    with pytest.raises(ConcatError) as error:
        logs.s.add("d", np.zeros(1))
    check(error, "'d'", "'s'", "string dataset")
    logs.close()
    assert snapshot(logs.filename) == before


def test_a_bad_add_does_not_drop_buffered_ones(logs):
    logs.add("ok", {"x": np.ones((1, 3), np.int32)})
    with pytest.raises(ConcatError):
        logs.add("bad", {"x": np.ones((1, 2), np.int32), "s": "fine"})  # nothing of it is kept
    logs.close()
    with h5py.File(logs.filename, "r") as h:
        assert h["__src__/id"].asstr()[:].tolist() == ["a", "ok"]
        assert h["s/values"].shape == (1,)


class Returns(h5m.Feature):
    def __init__(self, value):
        self.value = value

    def load(self, source):
        return self.value


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([1, 2], ["list", "np.asarray"]),
        (torch.zeros(2), ["Tensor", ".numpy()"]),
        (object(), ["object"]),
        (np.array([object()]), ["object array"]),
        ({"k": [1]}, ["list"]),
    ],
    ids=["list", "tensor", "object", "object-array", "dict-of-list"],
)
def test_unsupported_return_types(logs, value, words):
    before = snapshot(logs.filename)
    with pytest.raises(ResultTypeError) as error:
        Logs.create(
            logs.filename,
            ["src-1"],
            mode="a",
            schema={"bad": Returns(value)},
            scheduler="sync",
            progress=False,
        )
    assert isinstance(error.value, TypeError)
    assert error.value.source == "src-1" and error.value.feature.startswith("bad")
    check(error, "'src-1'", "'bad", *words)
    assert snapshot(logs.filename) == before


def test_bad_source_in_create_keeps_earlier_ones(tmp_path):
    class Shape(h5m.Feature):
        def load(self, source):
            return np.zeros((1, 3 if source != "2" else 5))

    path = tmp_path / "c.h5"
    with pytest.raises(ConcatError) as error:
        h5m.TypedFile.create(
            path, ["0", "1", "2", "3"], schema={"shape": Shape()}, scheduler="sync", progress=False
        )
    check(error, "'2'", "'shape'", "(1, 5)")
    with h5py.File(path, "r") as h:
        assert h["__src__/id"].asstr()[:].tolist() == ["0", "1"]
        assert h["shape/refs"][:].tolist() == [[0, 1], [1, 2]]
        assert h["shape/values"].shape == (2, 3)


def test_load_error_carries_its_cause(tmp_path):
    class Boom(h5m.Feature):
        def load(self, source):
            raise RuntimeError("kaboom")

    with pytest.raises(LoadError) as error:
        h5m.TypedFile.create(
            tmp_path / "l.h5", ["s"], schema={"boom": Boom()}, scheduler="sync", progress=False
        )
    check(error, "'s'", "'boom'", "RuntimeError", "kaboom")
    assert isinstance(error.value.__cause__, RuntimeError)


def test_unknown_id(logs):
    before = snapshot(logs.filename)
    for call in (logs.get, logs.x.get, logs.s.get, logs.root.get):
        with pytest.raises(UnknownIdError) as error:
            call("nope")
        assert isinstance(error.value, KeyError)
        check(error, "'nope'", logs.filename)
    with pytest.raises(KeyError):
        logs["nope"]  # noqa: B018
    with pytest.raises(UnknownIdError):
        logs.x.refs["nope"]  # noqa: B018
    with pytest.raises(UnknownIdError):
        logs.x.get(5)
    for proxy in (logs.x, logs.s):  # a feature's lookup names the feature too
        with pytest.raises(UnknownIdError) as error:
            proxy.get("nope")
        check(error, "'nope'", f"feature {proxy.path!r}", logs.filename, "no such source")
    assert snapshot(logs.filename) == before


def test_writes_to_a_read_only_file(logs):
    before = snapshot(logs.filename)
    ro = Logs(logs.filename, mode="r")
    writes = {
        "add": lambda: ro.add("b", {"x": np.zeros((1, 3), np.int32)}),
        "proxy add": lambda: ro.x.add("b", np.zeros((1, 3), np.int32)),
        "set": lambda: ro.x.set("a", np.ones((2, 3), np.int32)),
        "group set": lambda: ro.root.set("a", {"x": np.ones((2, 3), np.int32)}),
        "setitem by id": lambda: ro.x.__setitem__("a", np.ones((2, 3), np.int32)),
    }
    for name, write in writes.items():
        with pytest.raises(ReadOnlyError) as error:
            write()
        assert isinstance(error.value, PermissionError), name
        check(error, "'x'", logs.filename, "read-only")
        check(error, "'b'" if "add" in name else "'a'")
    with pytest.raises(ReadOnlyError) as error:
        ro.x[0] = np.ones(3, np.int32)
    check(error, "'x'", "item 0", "read-only")
    ro.close()
    assert snapshot(logs.filename) == before


def test_empty_schema_leaves_an_existing_file_alone(logs):
    before = snapshot(logs.filename)
    with pytest.raises(SchemaError, match="empty") as error:
        h5m.TypedFile.create(logs.filename, ["s"], schema={}, scheduler="sync", progress=False)
    assert isinstance(error.value, ValueError)

    class Nothing(h5m.TypedFile):
        pass

    with pytest.raises(SchemaError, match="Nothing declares no Feature"):
        Nothing.create(logs.filename, ["s"], scheduler="sync", progress=False)
    with pytest.raises(SchemaError, match="implements load") as error:
        Logs.create(logs.filename, ["s"], scheduler="sync", progress=False)
    check(error, "x", "s")
    with pytest.raises(SchemaError, match="'k' is a int"):
        h5m.TypedFile(logs.filename, mode="r", schema={"k": 3})
    assert snapshot(logs.filename) == before


def test_open_missing_and_non_hdf5_files(tmp_path):
    missing = tmp_path / "missing.h5"
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        h5m.TypedFile(missing)
    assert not missing.exists()
    text = tmp_path / "notes.txt"
    text.write_text("not hdf5")
    for mode in ("r", "r+", "a"):
        with pytest.raises(FileFormatError, match="notes.txt") as error:
            h5m.TypedFile(text, mode=mode)
        assert isinstance(error.value, OSError) and isinstance(error.value, h5m.H5DaskError)
    assert text.read_text() == "not hdf5"


def test_skip_records_failures_and_goes_on(tmp_path):
    class Picky(h5m.Feature):
        def load(self, source):
            if source == "bad":
                raise ValueError("no good")
            if source == "list":
                return [1]
            return np.zeros(1)

    f = h5m.TypedFile.create(
        tmp_path / "s.h5",
        ["a", "bad", "list", "b"],
        schema={"p": Picky()},
        on_error="skip",
        scheduler="sync",
        progress=False,
    )
    assert f.ids.tolist() == ["a", "b"]
    assert [(e.source, e.feature) for e in f.errors] == [("bad", "p"), ("list", "p")]
    assert "no good" in f.errors[0].message and "list" in f.errors[1].message
    with pytest.raises(ValueError, match="on_error"):
        h5m.TypedFile.create(
            tmp_path / "t.h5",
            ["a"],
            schema={"p": Picky()},
            on_error="maybe",
            scheduler="sync",
            progress=False,
        )


def test_a_bad_object_array_after_good_strings_is_refused_alone(tmp_path):
    class Notes(h5m.TypedFile):
        note = h5m.String()

    with Notes(tmp_path / "n.h5", mode="w") as notes:
        notes.add("a", {"note": np.array(["fine"], dtype=object)})
        notes.add("b", {"note": np.array(["also fine"], dtype=object)})
        with pytest.raises(h5m.errors.ResultTypeError) as error:
            notes.add("c", {"note": np.array([object()], dtype=object)})
        check(error, "'c'", "'note'", "object array")
        assert notes.note.get("b").tolist() == ["also fine"]
        assert notes.ids.tolist() == ["a", "b"]
