"""The on-disk format of docs/FORMAT.md, read back with plain h5py."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

import h5dask as h5m
from h5dask import format as fmt


class Image(h5m.Feature):
    __re__ = r"^\d+$"
    __ds_kwargs__ = {"compression": "lzf"}

    @property
    def attrs(self):
        return {
            "size": 4,
            "name": "img",
            "nothing": None,
            "shape": [4, 4],
            "labels": ["a", "b"],
            "nested": {"k": [1, "x"]},
            "empty": [],
            "flag": True,
        }

    def load(self, source):
        n = int(source)
        return None if n == 2 else np.full((n, 4, 4), n, dtype=np.uint8)


class Name(h5m.Feature):
    def load(self, source):
        return f"source-{source}-é"


SOURCES = ["0", "1", "2", "3", "x"]


@pytest.fixture
def path(tmp_path):
    path = tmp_path / "f.h5"
    h5m.TypedFile.create(
        path,
        SOURCES,
        schema={"data": h5m.Group(images=Image(), kind=Name())},
        scheduler="sync",
        progress=False,
    )
    return path


def test_root_and_ids(path):
    with h5py.File(path, "r") as h:
        assert h.attrs["format"] == "h5dask"
        assert h.attrs["format_version"] == 1
        ids = h["__src__/id"]
        assert h5py.check_string_dtype(ids.dtype).encoding == "utf-8"
        assert ids.asstr()[:].tolist() == SOURCES


def test_values_and_refs(path):
    with h5py.File(path, "r") as h:
        images = h["data/images"]
        assert set(images) == {"values", "refs"}
        refs = images["refs"]
        assert refs.dtype == np.int64 and refs.shape == (len(SOURCES), 2)
        assert refs[:].tolist() == [[0, 0], [0, 1], [-1, -1], [1, 4], [-1, -1]]
        values = images["values"]
        assert values.dtype == np.uint8 and values.shape == (4, 4, 4)
        assert values.compression == "lzf"
        assert np.array_equal(values[1:4], np.full((3, 4, 4), 3, dtype=np.uint8))
        names = h["data/kind/values"]
        assert h5py.check_string_dtype(names.dtype).encoding == "utf-8"
        assert names.asstr()[h["data/kind/refs"][4, 0]] == "source-x-é"


def test_attrs_are_json_safe_and_never_pickled(path):
    with h5py.File(path, "r") as h:
        attrs = dict(h["data/images"].attrs)
    assert sorted(attrs["__json__"].tolist()) == ["empty", "nested", "nothing"]
    assert attrs["nothing"] == "null" and attrs["nested"] == '{"k": [1, "x"]}'
    assert attrs["size"] == 4 and attrs["name"] == "img" and bool(attrs["flag"]) is True
    assert attrs["shape"].tolist() == [4, 4] and attrs["labels"].tolist() == ["a", "b"]
    for value in attrs.values():
        array = np.asarray(value)
        assert array.dtype.kind in "biufUO"
        assert all(isinstance(v, (str, int, float, bool, np.generic)) for v in array.ravel())
        assert not (isinstance(value, bytes) and value.startswith(b"\x80"))  # no pickle
    f = h5m.TypedFile(path)
    assert f.data.images.attrs == Image().attrs


def test_rewritten_attrs_keep_the_json_list_exact(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as h:
        fmt.write_attrs(h, {"a": None, "b": 1})
        fmt.write_attrs(h, {"a": 2})
        assert "__json__" not in h.attrs  # "a" is stored natively now
        assert fmt.read_attrs(h) == {"a": 2, "b": 1}


def test_attrs_round_trip_exactly(tmp_path):
    attrs = {
        "mixed": [1, "b"],
        "bools": [True, False],
        "bool_int": [True, 2],
        "floats": [1.5, 2],
        "nested": [[1, 2], [3, 4]],
        "none": None,
    }
    with h5py.File(tmp_path / "a.h5", "w") as h:
        fmt.write_attrs(h, attrs)
        assert fmt.read_attrs(h) == attrs
        assert type(fmt.read_attrs(h)["bools"][0]) is bool
        assert sorted(h.attrs["__json__"].tolist()) == ["bool_int", "mixed", "nested", "none"]


def test_default_chunks(tmp_path):
    class Logs(h5m.TypedFile):
        big = h5m.Array()
        tiny = h5m.Array()
        wide = h5m.Array()
        first = h5m.Array()
        explicit = h5m.Array(chunks=(7, 3))

    logs = Logs(tmp_path / "c.h5", mode="w")
    logs.add(
        "0",
        {
            "big": np.zeros((1000, 64, 64), np.float32),
            "tiny": np.zeros(3),
            "wide": np.zeros((2, 1000, 1000), np.float32),
            "first": np.zeros((4, 12)),
            "explicit": np.zeros((2, 3)),
        },
    )
    logs.close()
    with h5py.File(logs.filename, "r") as h:

        def nbytes(name):
            ds = h[f"{name}/values"]
            return math.prod(ds.chunks) * ds.dtype.itemsize

        assert 512 << 10 <= nbytes("big") <= 1 << 20
        assert 512 << 10 <= nbytes("wide") <= 1 << 20
        assert h["wide/values"].chunks[0] == 1  # a row larger than a chunk is split
        assert 16 << 10 <= nbytes("tiny") < 512 << 10
        assert h["first/values"].chunks != (4, 12)  # never the first array's shape
        assert h["first/values"].chunks[1:] == (12,)
        assert h["explicit/values"].chunks == (7, 3)
        assert h["big/refs"].chunks[1] == 2 and h["__src__/id"].chunks[0] >= 1024


@pytest.mark.parametrize("flush_bytes", [1, 1 << 30])
def test_chunks_depend_on_the_first_source_not_on_batching(tmp_path, flush_bytes):
    class Items(h5m.TypedFile):
        x = h5m.Array()
        log = h5m.Array()

    with Items(tmp_path / "i.h5", mode="w") as items:
        items._get_writer().flush_bytes = flush_bytes  # a commit per add, or one at close
        for i in range(100):
            items.add(str(i), {"x": np.zeros((2 + i % 3, 64), np.float32)})
            if i >= 10:  # a log of one number, from the 11th id on
                items.add(str(i), {"log": np.zeros(1)})
    with h5py.File(tmp_path / "i.h5", "r") as h:
        assert h["x/values"].chunks == (2048, 64)  # 512 KiB: 1024 first x of 512 B
        assert h["log/values"].chunks == (2048,)  # 16 KiB, the least


class Word(h5m.Feature):
    def load(self, source):
        return "w" * (1 + int(source) * 7 % 200)


class Words(h5m.TypedFile):
    word = Word()
    letters = h5m.Array()


def test_string_chunks_do_not_depend_on_batching(tmp_path):
    """A build resumed after its first commit gets the chunks of a clean one: a batch of
    numpy strings is as wide as its longest, which once set the first source's size."""
    sources = [str(i) for i in range(300)]
    clean, resumed = tmp_path / "clean.h5", tmp_path / "resumed.h5"
    Words.create(clean, sources, scheduler="sync", progress=False)
    Words.create(resumed, sources[:1], scheduler="sync", progress=False)  # "interrupted"
    Words.create(resumed, sources, mode="a", scheduler="sync", progress=False)
    for flush_bytes, path in [(1, tmp_path / "adds.h5"), (1 << 30, tmp_path / "batch.h5")]:
        with Words(path, mode="w") as f:
            f._get_writer().flush_bytes = flush_bytes  # a commit per add, or one at close
            for i in range(50):
                f.add(str(i), {"letters": np.array(["ab", "c" * (i + 1)])})
    with h5py.File(clean) as a, h5py.File(resumed) as b:
        assert a["word/values"][:].tolist() == b["word/values"][:].tolist()
        assert a["word/values"].chunks == b["word/values"].chunks == (1024,)  # 64 B a str
    with h5py.File(tmp_path / "adds.h5") as a, h5py.File(tmp_path / "batch.h5") as b:
        assert a["letters/values"].chunks == b["letters/values"].chunks == (2048,)  # 2 x 64 B first


def test_uncommitted_tails_are_trimmed_on_the_next_write(tmp_path):
    path = tmp_path / "t.h5"
    f = h5m.TypedFile(path, mode="w")
    f.add("a", {"x": np.arange(3)})
    f.close()
    with h5py.File(path, "r+") as h:  # a batch that crashed before appending its ids
        h["x/values"].resize(10, axis=0)
        h["x/values"][3:] = 99
        h["x/refs"].resize(2, axis=0)
        h["x/refs"][1] = (3, 10)
    f = h5m.TypedFile(path, mode="r+")
    assert f.ids.tolist() == ["a"] and f.x.refs.array.tolist() == [[0, 3]]
    f.add("b", {"x": np.array([7, 8])})
    f.close()
    with h5py.File(path, "r") as h:
        assert h["__src__/id"].asstr()[:].tolist() == ["a", "b"]
        assert h["x/values"][:].tolist() == [0, 1, 2, 7, 8]
        assert h["x/refs"][:].tolist() == [[0, 3], [3, 5]]


def test_refs_of_features_grow_with_ids(tmp_path):
    f = h5m.TypedFile(tmp_path / "g.h5", mode="w")
    f.add("a", {"x": np.zeros(1)})
    f.add("b", {"y": np.zeros(2)})
    f.close()
    with h5py.File(f.filename, "r") as h:
        assert h["x/refs"][:].tolist() == [[0, 1], [-1, -1]]
        assert h["y/refs"][:].tolist() == [[-1, -1], [0, 2]]


def test_numbers_are_stored_without_a_fill_value_unless_one_is_set(tmp_path):
    """Every row of values is written by the append that adds it, so HDF5 need not fill
    new chunks; a fillvalue of __ds_kwargs__, and strings, keep HDF5's fill."""

    class Logs(h5m.TypedFile):
        x = h5m.Array()
        filled = h5m.Array(fillvalue=7)
        name = h5m.Array()

    rng = np.random.default_rng(0)
    arrays = [rng.random((3 + k % 5, 4), dtype=np.float32) for k in range(700)]
    with Logs(tmp_path / "l.h5", mode="w") as f:
        f._get_writer().flush_bytes = 4096  # commits end inside chunks
        for k, x in enumerate(arrays):
            f.add(str(k), {"x": x, "filled": x[:, 0], "name": f"n{k}"})
    with h5py.File(tmp_path / "l.h5", "r") as h:
        fill_time = {
            name: h[f"{name}/values"].id.get_create_plist().get_fill_time()
            for name in ("x", "filled", "name")
        }
        assert fill_time["x"] == h5py.h5d.FILL_TIME_NEVER
        assert h5py.h5d.FILL_TIME_NEVER not in (fill_time["filled"], fill_time["name"])
        assert np.array_equal(h["x/values"][:], np.concatenate(arrays))
        assert np.array_equal(h["filled/values"][:], np.concatenate(arrays)[:, 0])
        assert h["x/values"].chunks[0] * 16 > 16 * 1024  # several commits a chunk


def test_feature_paths_are_the_features_of_the_layout(path):
    with h5py.File(path, "r") as h:
        layout = fmt.read_layout(h)
        features = [p for p, node in layout.items() if node.kind == "feature"]
        assert fmt.feature_paths(h) == features == ["data/images", "data/kind"]


def test_errors_table(tmp_path):
    class Fails(h5m.Feature):
        def load(self, source):
            if source == "bad":
                raise RuntimeError("kaboom")
            return np.zeros(1)

    f = h5m.TypedFile.create(
        tmp_path / "e.h5",
        ["ok", "bad"],
        schema={"x": Fails()},
        on_error="skip",
        scheduler="sync",
        progress=False,
    )
    assert f.ids.tolist() == ["ok"]
    with h5py.File(f.filename, "r") as h:
        errors = h["__errors__"]
        assert errors["source"].asstr()[:].tolist() == ["bad"]
        assert errors["feature"].asstr()[:].tolist() == ["x"]
        assert "kaboom" in errors["message"].asstr()[0]
    assert [(e.source, e.feature) for e in f.errors] == [("bad", "x")]
    assert set(f.keys()) == {"x"}  # reserved groups are not features


def test_plain_h5py_reading_as_in_the_docs(path):
    with h5py.File(path, "r") as f:
        ids = f["__src__/id"].asstr()[:]
        refs = f["data/images/refs"][:]
        position = list(ids).index("3")
        start, stop = refs[position]
        image = f["data/images/values"][start:stop] if start >= 0 else None
    assert np.array_equal(image, h5m.TypedFile(path).data.images.get("3"))


def test_append_blocks_writes_any_blocks_over_any_chunks(tmp_path):
    """Chunk-aligned appends (whole chunks straight from blocks) equal plain concatenation."""
    rng = np.random.default_rng(7)
    for trial in range(150):
        step = int(rng.integers(1, 12))
        with h5py.File(tmp_path / "a.h5", "w", rdcc_nbytes=int(rng.choice([0, 1 << 20]))) as f:
            ds = f.create_dataset("v", (0, 3), np.int64, maxshape=(None, 3), chunks=(step, 3))
            expected: list[int] = []
            for _ in range(int(rng.integers(1, 5))):  # flushes
                sizes = rng.choice([0, 1, step - 1, step, step + 1, 2 * step + 3, 37], 5)
                blocks = []
                for n in sizes[: int(rng.integers(0, 6))]:
                    base = len(expected) + sum(len(b) for b in blocks)
                    blocks.append(np.repeat(np.arange(base, base + n)[:, None], 3, axis=1))
                assert fmt.append_blocks(ds, blocks) == len(expected)
                expected += [int(v) for b in blocks for v in b[:, 0]]
            assert ds[:, 0].tolist() == expected, (trial, step)
            assert (ds[:, 1] == ds[:, 0]).all()


def test_hard_get_goes_on_from_the_deepest_group_it_reached(tmp_path):
    path = "/".join(f"g{k}" for k in range(300))
    with h5py.File(tmp_path / "deep.h5", "w") as f:
        f.create_group(path).attrs["depth"] = 300
        f["g0/soft"] = h5py.SoftLink("/g0")
        reached: dict = {}
        assert fmt.hard_get(f, path, reached).attrs["depth"] == 300
        assert len(reached) == 300 and reached[path].name == "/" + path
        middle = reached["g0/g1/g2"]
        assert fmt.hard_get(f, "g0/g1/g2", reached) is middle  # no walk: reached before
        assert fmt.hard_get(f, path + "/missing", reached) is None
        assert fmt.hard_get(f, "g0/soft/g1", reached) is None  # never through a soft link
        assert fmt.hard_get(f, "g0/g1").name == "/g0/g1"  # without a cache too
