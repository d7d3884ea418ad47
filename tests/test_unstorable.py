"""Values HDF5 cannot store (issue 23): each is refused alone, naming source, feature and cause.

Before, a NUL in a string, a lone surrogate, datetime64, 33 dimensions or a zero-width axis
failed the whole partition (and ``on_error="skip"`` with it) with a bare ``ValueError``,
``UnicodeEncodeError`` or ``TypeError`` from h5py; trailing NULs of bytes were cut
silently; an unknown compression name or attrs that are not JSON failed at the first
commit; an exception whose ``str()`` raises escaped as a plain ``RuntimeError``. Now each
is an h5dask error, or with ``on_error="skip"`` a recorded failure of that one source, while
the other sources of its partition are written.
"""

from __future__ import annotations

import threading

import distributed
import h5py
import numpy as np
import pytest

import h5dask as h5m
from h5dask import engine
from h5dask.errors import LoadError, ResultTypeError, SchemaError
from h5dask.extract import normalize


class Weird(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self):
        raise RuntimeError("no str for you")


class Unpicklable(Weird):
    """... and which does not pickle either (it holds a lock)."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()


STRING_ADVICE = "HDF5 strings cannot store"
CASES = {  # name: (bad value, good value, words of the cause)
    "nul-in-bytes": (b"a\0b", b"ab", ["NUL byte at offset 1", "np.frombuffer(data, np.uint8)"]),
    "trailing-nul-bytes": (b"ab\0\0", b"ab", ["NUL byte at offset 2", "np.frombuffer"]),
    "nul-in-str": ("a\0b", "ab", ["NUL character at offset 1", STRING_ADVICE]),
    "trailing-nul-str": ("ab\0", "ab", ["NUL character at offset 2", STRING_ADVICE]),
    "surrogate-str": ("a\udcffb", "ab", ["'\\udcff' at offset 1", "lone surrogate"]),
    "nul-in-str-array": (np.array(["ok", "a\0b"]), np.array(["ok", "abc"]), ["element [1]", "NUL"]),
    "nul-in-bytes-array": (np.array([[b"x", b"\0y"]]), np.array([[b"x", b"y"]]), ["[0, 1]"]),
    "surrogate-object-array": (
        np.array(["\udc80"], dtype=object),
        np.array(["é"], dtype=object),
        ["element [0]", "lone surrogate"],
    ),
    "datetime64": (
        np.array(["2020-01-01"], "M8[D]"),
        np.array([3]),
        ["datetime64[D] values", "no date type"],
    ),
    "timedelta64": (np.array([5], "m8[s]"), np.array([3]), ["timedelta64[s]", "astype('int64')"]),
    "33-dims": (np.zeros((1,) * 33), np.ones((1, 2)), ["33 dimensions", "at most 32"]),
    "zero-width-axis": (np.zeros((3, 0)), np.ones((3, 2)), ["shape (3, 0)", "length 0"]),
}
# 64 sources: partitions of 4 (2 workers) to 8 (one), so that "bad", the 11th, shares one
SOURCES = [f"s{k:02d}" for k in range(64)]
SOURCES[10] = "bad"
assert engine.partition_size(len(SOURCES), 2) == 4 and engine.partition_size(64, 1) == 8


class Value(h5m.Feature):
    """``bad`` for the source ``bad_source``, ``good`` for the others."""

    def __init__(self, case: str, bad_source: str = "bad"):
        self.bad, self.good, _ = CASES[case] if case in CASES else (None, np.ones(2), None)
        self.case, self.bad_source = case, bad_source

    def load(self, source):
        if source != self.bad_source:
            return self.good
        if self.case == "weird":
            raise Weird()
        if self.case == "unpicklable":
            raise Unpicklable()
        return self.bad


WEIRD_WORDS = ["load() raised Weird", "<str() of the exception raised RuntimeError>"]
WORDS = {name: words for name, (_, _, words) in CASES.items()} | {"weird": WEIRD_WORDS}
WORDS["unpicklable"] = ["load() raised Unpicklable", WEIRD_WORDS[1]]


def build(path, case, **kwargs):
    kwargs.setdefault("scheduler", "sync")
    schema = {"v": Value(case), "n": Length()}
    return h5m.TypedFile.create(path, SOURCES, schema=schema, progress=False, **kwargs)


class Length(h5m.Feature):
    """A second feature, whose result a failed source loses with the rest of it."""

    def load(self, source):
        return np.array([len(source)])


def same(read, expected) -> bool:
    expected = normalize(expected)
    return read.shape == expected.shape and read.tolist() == expected.tolist()


def check_named(error, case: str, source: str = "bad", feature: str = "v"):
    assert (error.source, error.feature) == (source, feature), str(error)
    message = str(error)
    for word in [f"source {source!r}", f"feature {feature!r}", *WORDS[case]]:
        assert word in message, f"{word!r} not in {message!r}"


def plain_ids(path) -> list[str]:
    with h5py.File(path, "r") as f:
        return f["__src__/id"].asstr()[()].tolist()


def check_read_back(file, good: list[str], schema: dict) -> None:
    """Every good source's data of every feature read back equal to what it loaded: all of
    them at once, and by id the neighbours of the bad source."""
    assert file.ids.tolist() == good
    for name, feature in schema.items():
        proxy = file.get_proxy(name)
        assert same(proxy[:], np.concatenate([normalize(feature.load(s)) for s in good]))
        for source in ("s09", "s11"):
            assert same(proxy.get(source), feature.load(source)), (name, source)


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
@pytest.mark.parametrize("case", [*CASES, "weird"])
def test_an_unstorable_value_fails_its_source_alone(tmp_path, case, scheduler):
    with pytest.raises(h5m.H5DaskError) as info:
        build(tmp_path / "raise.h5", case, on_error="raise", scheduler=scheduler)
    check_named(info.value, case)
    assert plain_ids(tmp_path / "raise.h5") == SOURCES[:10]  # the sources before it
    file = build(tmp_path / "skip.h5", case, on_error="skip", scheduler=scheduler)
    assert [(e.source, e.feature) for e in file.errors] == [("bad", "v")]
    assert all(word in file.errors[0].message for word in WORDS[case]), file.errors[0]
    check_read_back(file, [s for s in SOURCES if s != "bad"], {"v": Value(case), "n": Length()})


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        yield client


def test_the_errors_come_back_from_worker_processes(tmp_path, client):
    """Every case at once, each bad source a feature of its own, on a LocalCluster of worker
    processes: each error survives pickling, its cause too (or a description of it, for
    an exception that neither prints nor pickles)."""
    cases = ["weird", "unpicklable", *CASES]
    schema = {case: Value(case, f"bad-{case}") for case in cases}
    sources = [*SOURCES[:10], *[f"bad-{case}" for case in cases], *SOURCES[11:]]
    with pytest.raises(LoadError) as info:
        h5m.TypedFile.create(tmp_path / "r.h5", sources, schema=schema, scheduler=client)
    check_named(info.value, "weird", "bad-weird", "weird")
    assert isinstance(info.value.__cause__, Weird)
    assert plain_ids(tmp_path / "r.h5") == SOURCES[:10]
    file = h5m.TypedFile.create(
        tmp_path / "s.h5", sources, schema=schema, scheduler=client, on_error="skip"
    )
    assert [(e.source, e.feature) for e in file.errors] == [(f"bad-{c}", c) for c in cases]
    for case, failure in zip(cases, file.errors, strict=True):
        assert all(word in failure.message for word in WORDS[case]), failure
    check_read_back(file, [s for s in SOURCES if s != "bad"], schema)


class Logs(h5m.TypedFile):
    v = h5m.Array()
    n = h5m.Array()


@pytest.mark.parametrize("case", list(CASES))
def test_an_unstorable_add_is_refused_and_keeps_the_adds_before_it(tmp_path, case):
    bad, good, _ = CASES[case]
    logs = Logs(tmp_path / "l.h5", mode="w")
    logs.add("a", {"v": good, "n": np.array([1])})  # the first add commits at once
    logs.add("b", {"v": good, "n": np.array([2])})  # buffered
    pending = logs._writer.pending
    with pytest.raises(ResultTypeError) as info:
        logs.add("bad", {"n": np.array([3]), "v": bad})
    assert (info.value.source, info.value.feature) == ("bad", "v")
    for word in WORDS[case]:
        assert word in str(info.value), (word, str(info.value))
    assert logs._writer.pending == pending  # nothing of the bad add is buffered
    with pytest.raises(ResultTypeError):
        logs.v.add("bad", bad)  # through the feature's proxy as well
    logs.add("c", {"v": good, "n": np.array([4])})
    logs.close()
    reread = Logs(logs.filename)
    assert reread.ids.tolist() == ["a", "b", "c"]
    assert all(same(reread.v.get(id), good) for id in ["a", "b", "c"])
    assert reread.n[:].tolist() == [1, 2, 4]


def test_an_unstorable_first_value_of_a_new_feature_is_refused_on_add(tmp_path):
    """The dataset a first value would create is tried first, so the commit cannot fail."""
    logs = Logs(tmp_path / "l.h5", mode="w")
    logs.add("a", {"n": np.array([1])})
    for case in CASES:
        bad = CASES[case][0]
        with pytest.raises(ResultTypeError) as info:
            logs.add("bad", {"v": bad})
        assert info.value.feature == "v" and WORDS[case][0] in str(info.value)
    logs.add("b", {"n": np.array([2])})
    logs.close()
    assert Logs(logs.filename).n[:].tolist() == [1, 2]


# -- problems that do not depend on a source: refused before any load -----------------------

LOADED: list[str] = []


class Compressed(h5m.Feature):
    def __init__(self, **ds_kwargs):
        self.__ds_kwargs__ = ds_kwargs

    def load(self, source):
        LOADED.append(source)
        return np.ones(3)


class WithAttrs(h5m.Feature):
    def __init__(self, attrs=None):
        self._attrs, self.computed = attrs or {}, attrs is None

    @property
    def attrs(self):
        return self._attrs

    def before_create(self, sources):
        if self.computed:
            self._attrs = {"seen": set(sources)}  # computed from the sources, not JSON

    def load(self, source):
        LOADED.append(source)
        return np.ones(3)


SCHEMA_CASES = {
    "unknown-compression": (
        Compressed(compression="zstd"),
        ['"zstd" is unavailable', "hdf5plugin"],
    ),
    "unknown-filter-number": (Compressed(compression=32015), ["filter number: 32015"]),
    "misspelled-keyword": (Compressed(compresion="gzip"), ["unexpected keyword", "compresion"]),
    "bad-gzip-level": (Compressed(compression="gzip", compression_opts=12), ["0-9"]),
    "bad-dtype": (Compressed(dtype="M8[s]"), ["No conversion path", "M8"]),
    "nested-bad-compression": (Compressed(arr={"compression": "nope"}), ["['arr']", "nope"]),
    "set-in-attrs": (WithAttrs({"labels": {"a", "b"}}), ["attrs['labels'] is a set", "JSON"]),
    "int-keys-in-attrs": (WithAttrs({"vocab": {0: "cat"}}), ["key 0 (int)", "str keys"]),
    "array-in-attrs": (WithAttrs({"x": {"y": np.zeros(2)}}), ["ndarray", ".tolist()"]),
    "attrs-from-before-create": (WithAttrs(), ["attrs['seen'] is a set"]),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_a_bad_schema_is_refused_before_any_load_and_the_file_is_untouched(tmp_path, case):
    feature, words = SCHEMA_CASES[case]
    path = tmp_path / "s.h5"
    h5m.TypedFile.create(path, ["x"], schema={"n": Length()}, progress=False, scheduler="sync")
    with open(path, "rb") as f:
        before = f.read()
    LOADED.clear()
    for mode in ("w", "a"):
        with pytest.raises(SchemaError) as info:
            h5m.TypedFile.create(
                path, ["a", "b"], mode=mode, schema={"bad": feature, "n": Length()},
                scheduler="threads", progress=False,
            )  # fmt: skip
        assert str(info.value).startswith("feature 'bad': ")
        for word in words:
            assert word in str(info.value), (word, str(info.value))
    assert LOADED == []
    with open(path, "rb") as f:
        assert f.read() == before  # not truncated by mode "w" either


@pytest.mark.parametrize("case", [c for c in SCHEMA_CASES if c != "attrs-from-before-create"])
def test_a_bad_schema_is_refused_when_a_file_is_opened_for_adds(tmp_path, case):
    feature, words = SCHEMA_CASES[case]
    path = tmp_path / "a.h5"
    for mode in ("w", "a"):
        with pytest.raises(SchemaError, match="feature 'bad'"):
            h5m.TypedFile(path, mode=mode, schema={"bad": feature})
    assert not path.exists()
    h5m.TypedFile(path, mode="w", schema={"n": Length()}).add("x", {"n": np.ones(1)}).close()
    with pytest.raises(SchemaError, match="feature 'bad'"):
        h5m.TypedFile(path, mode="r+", schema={"bad": feature})
    assert h5m.TypedFile(path, schema={"bad": feature}).ids.tolist() == ["x"]  # reads work


def test_text_attrs_that_hdf5_strings_cannot_hold_go_as_json_and_come_back(tmp_path):
    attrs = {"nul": "a\0b", "name": "bad-\udcff.wav", "names": ["ok", "x\0y"], "np": np.str_("s")}
    file = h5m.TypedFile.create(
        tmp_path / "t.h5", ["a"], schema={"w": WithAttrs(attrs)}, progress=False, scheduler="sync"
    )
    assert file.w.attrs == {**attrs, "np": "s"}
    assert h5m.TypedFile(file.filename).w.attrs == {**attrs, "np": "s"}
