"""TypedFile: create, modes, add/get/set, handles, pickling, foreign and in-memory files."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import h5dask as h5m
from h5dask.errors import (
    ConcatError,
    FileFormatError,
    FileLockedError,
    OverwriteError,
    SchemaError,
    UnknownIdError,
)

SOURCES = [str(i) for i in range(6)]


class Rows(h5m.Feature):
    """``n + 1`` rows of 3 floats for source ``"n"`` (ragged along axis 0)."""

    __re__ = r"^\d+$"

    @property
    def attrs(self):
        return {"param1": 18, "param2": "hey", "param3": None}

    def load(self, source):
        n = int(source)
        return np.full((n + 1, 3), n, dtype=np.float32)

    def custom_method(self, inputs):
        return np.zeros_like(inputs)


class Pair(h5m.Feature):
    """A dict of two arrays."""

    __re__ = r"^\d+$"

    def load(self, source):
        n = int(source)
        return {"x": np.arange(n + 1), "y": np.full((2, 2), n, dtype=np.int16)}


class Nested(h5m.Feature):
    """A dict of dicts."""

    __re__ = r"^\d+$"

    def load(self, source):
        n = int(source)
        return {"p": {"x": np.full(2, n)}, "q": {"y": np.full(3, n, dtype=np.float64)}}


class Word(h5m.Feature):
    """The source string itself."""

    def load(self, source):
        return source


class Doubled(h5m.Feature):
    """Derived from ``rows``: receives its result, not the source."""

    derived_from = "rows"

    def load(self, rows):
        return rows[:, 0] * 2


class Zeroed(h5m.Feature):
    """Writes, then zeroes its dataset in ``after_create``."""

    __re__ = r"^\d+$"

    def load(self, source):
        return np.ones(2)

    def after_create(self, file, feature_key):
        proxy = file.get_proxy(feature_key)
        proxy[:] = np.zeros(len(proxy))


class Experiment(h5m.TypedFile):
    rows = Rows()
    pair = Pair()
    nested = Nested()
    word = Word()
    doubled = Doubled()
    zeroed = Zeroed()
    logs = h5m.Group(loss=h5m.Array())

    def after_create(self):
        self.logs.add("created", {"loss": np.array([1.0, 0.5])})


@pytest.fixture
def exp(tmp_path):
    return Experiment.create(tmp_path / "exp.h5", SOURCES, scheduler="sync", progress=False)


class XY(h5m.TypedFile):
    """Two array features, for the tests of ``add``."""

    x = h5m.Array()
    y = h5m.Array()


def test_create_returns_an_r_plus_file_without_handle(exp):
    assert isinstance(exp, Experiment)
    assert exp.mode == "r+"
    assert not exp._handle.is_open
    assert exp.ids.tolist() == [*SOURCES, "created"]
    assert len(exp) == 7 and "3" in exp and "7" not in exp


def test_arrays_by_id_ref_and_item(exp):
    assert np.array_equal(exp.rows.get("2"), np.full((3, 3), 2, dtype=np.float32))
    assert np.array_equal(exp.rows["4"], np.full((5, 3), 4, dtype=np.float32))
    assert np.array_equal(exp.rows[exp.rows.refs[1]], np.full((2, 3), 1, dtype=np.float32))
    assert exp.rows.get(2).shape == (3, 3)  # an int is the position of an id
    assert exp.rows.shape == (21, 3) and len(exp.rows) == 21
    assert exp.rows.dtype == np.float32
    assert np.array_equal(exp.rows[:3, 0], [0, 1, 1])
    assert np.array_equal(exp.rows[[0, 2]][:, 0], [0, 1])
    assert exp.rows.get("created") is None
    assert exp.rows.ids.tolist() == SOURCES


def test_dicts_and_dicts_of_dicts(exp):
    got = exp.pair.get("3")
    assert set(got) == {"x", "y"}
    assert np.array_equal(got["x"], np.arange(4))
    assert got["y"].dtype == np.int16 and got["y"].shape == (2, 2)
    assert np.array_equal(exp.pair["3"]["x"], got["x"])
    nested = exp.nested["5"]
    assert np.array_equal(nested["p"]["x"], [5, 5])
    assert np.array_equal(nested["q"]["y"], [5.0] * 3)
    assert isinstance(exp.nested.p, h5m.GroupProxy)
    assert isinstance(exp.nested.p.x, h5m.DatasetProxy)


def test_strings_are_stored_as_utf8(exp):
    assert exp.word.get("4").tolist() == ["4"]
    assert exp.word[:].tolist() == SOURCES
    exp.word.add("ünïcode", "ünïcode")
    assert exp.word.get("ünïcode").tolist() == ["ünïcode"]


def test_derived_from_and_after_create(exp):
    assert np.array_equal(exp.doubled.get("3"), [6.0] * 4)
    assert np.array_equal(exp.zeroed[:], np.zeros(12))
    assert np.array_equal(exp.logs.loss.get("created"), [1.0, 0.5])


def test_file_get_is_a_nested_dict_of_the_features_with_data(exp):
    got = exp.get("1")
    assert set(got) == {"rows", "pair", "nested", "word", "doubled", "zeroed"}
    assert set(exp["created"]) == {"logs"}
    assert np.array_equal(exp[1]["rows"], got["rows"])


def test_re_filter_and_none_leave_cells_empty(tmp_path):
    class Maybe(h5m.Feature):
        __re__ = r"^\d+$"

        def load(self, source):
            return None if int(source) % 2 else np.array([int(source)])

    class Letters(h5m.Feature):
        __re__ = r"^[a-z]$"

        def load(self, source):
            return np.array([ord(source)])

    f = h5m.TypedFile.create(
        tmp_path / "f.h5",
        ["0", "1", "2", "a", "%"],
        schema={"maybe": Maybe(), "letters": Letters()},
        scheduler="sync",
        progress=False,
    )
    assert f.ids.tolist() == ["0", "2", "a"]  # "1" and "%" produced nothing: no id
    assert f.maybe.get("a") is None and f.letters.get("0") is None
    assert f.maybe.refs.array.tolist() == [[0, 1], [1, 2], [-1, -1]]
    assert [r for r in f.letters.refs] == [None, None, slice(0, 1)]


def test_results_of_every_kind(tmp_path):
    class Logs(h5m.TypedFile):
        a = h5m.Array()
        b = h5m.Array()
        c = h5m.Array()
        d = h5m.Array()
        e = h5m.Array()

    logs = Logs(tmp_path / "k.h5", mode="w")
    logs.add(
        "0", {"a": 3, "b": np.float32(2.5), "c": np.array(7), "d": np.zeros((0, 3)), "e": True}
    )
    got = logs.get("0")
    assert got["a"].tolist() == [3] and got["b"].dtype == np.float32
    assert got["c"].tolist() == [7]  # a 0-d array gains an axis
    assert got["d"].shape == (0, 3)  # a zero-row result is an empty region, not an absence
    assert logs.d.refs[0] == slice(0, 0)
    assert got["e"].tolist() == [True]


def test_dtype_rule_safe_casts_and_errors(tmp_path):
    class Logs(h5m.TypedFile):
        f = h5m.Array()
        i = h5m.Array(dtype="int32")

    logs = Logs(tmp_path / "d.h5", mode="w")
    logs.add("0", {"f": np.zeros(2, np.float64), "i": np.arange(3)})  # int64 -> int32 same_kind
    logs.add("1", {"f": np.ones(2, np.int32)})  # int32 -> float64 is safe
    assert logs.f.dtype == np.float64 and logs.i.dtype == np.int32
    assert logs.f.get("1").dtype == np.float64
    assert np.array_equal(logs.i.get("0"), [0, 1, 2])
    with pytest.raises(h5m.errors.ConcatError, match="float64"):
        logs.add("2", {"i": np.ones(2)})  # float -> int is not same_kind
    with pytest.raises(h5m.errors.ConcatError, match="complex128"):
        logs.add("2", {"f": np.ones(2, complex)})


def test_modes(tmp_path):
    path = tmp_path / "m.h5"
    with pytest.raises(FileNotFoundError):
        h5m.TypedFile(path, mode="r")
    with pytest.raises(FileNotFoundError):
        h5m.TypedFile(path, mode="r+")
    h5m.TypedFile(path, mode="w-").add("a", {"x": np.zeros(1)}).close()
    with pytest.raises(FileFormatError):
        h5m.TypedFile(path, mode="w-")
    appended = h5m.TypedFile(path, mode="a")
    appended.add("b", {"x": np.ones(1)}).close()
    assert h5m.TypedFile(path, mode="r").ids.tolist() == ["a", "b"]
    assert h5m.TypedFile(path, mode="r").mode == "r"
    rw = h5m.TypedFile(path, mode="r+")
    rw.x.set("a", np.full(1, 5.0))
    assert h5m.TypedFile(path).x.get("a").tolist() == [5.0]
    with pytest.raises(FileLockedError):  # rw writes it until closed
        h5m.TypedFile(path, mode="w")
    rw.close()
    assert len(h5m.TypedFile(path, mode="w")) == 0  # truncated
    with pytest.raises(ValueError, match="mode"):
        h5m.TypedFile(path, mode="rw")


def test_create_append_mode_skips_committed_ids(tmp_path):
    calls = []

    class Count(h5m.Feature):
        def load(self, source):
            calls.append(source)
            return np.array([int(source)])

    path = tmp_path / "c.h5"
    h5m.TypedFile.create(path, ["0", "1"], schema={"n": Count()}, scheduler="sync", progress=False)
    f = h5m.TypedFile.create(
        path, ["0", "1", "2"], mode="a", schema={"n": Count()}, scheduler="sync", progress=False
    )
    assert calls == ["0", "1", "2"]
    assert f.ids.tolist() == ["0", "1", "2"] and f.n[:].tolist() == [0, 1, 2]


def test_group_add_get_set(exp):
    exp.logs.add("train", {"loss": np.arange(4.0)})
    assert np.array_equal(exp.logs.get("train")["loss"], np.arange(4.0))
    exp.logs.set("train", {"loss": np.full(4, 2.0)})  # same length: in place
    assert exp.logs["train"]["loss"].tolist() == [2.0] * 4
    exp.logs["train"] = {"loss": np.ones(6)}  # new length: appended, ref moved
    assert exp.logs.loss.get("train").tolist() == [1.0] * 6
    exp.logs.set("val", {"acc": np.array([0.9])})  # a new id and a new member
    assert "acc" in exp.logs.keys() and isinstance(exp.logs.acc, h5m.DatasetProxy)
    assert exp.logs["val"]["acc"].tolist() == [0.9]
    exp["test"] = {"logs": {"loss": np.zeros(1)}}
    exp.set("test2", {"word": "x"})
    assert exp.logs.loss.get("test").tolist() == [0.0]
    assert exp.word.get("test2").tolist() == ["x"]


def test_add_buffers_until_read_flush_or_close(tmp_path):
    path = tmp_path / "b.h5"

    class Logs(h5m.TypedFile):
        loss = h5m.Array()

    logs = Logs(path, mode="w")
    logs.add("first", {"loss": np.zeros(1)})  # committed at once: see the test below
    logs._get_writer().flush_seconds = 60.0  # no commit by age in this test
    logs.add("0", {"loss": np.zeros(3)})
    with h5py.File(path, "r") as h:
        assert h["__src__/id"].shape == (1,)  # buffered, not yet on disk
    assert logs.loss.get("0").tolist() == [0.0] * 3  # a read through the object commits
    logs.add("1", {"loss": np.ones(1)})
    logs.flush()
    with h5py.File(path, "r") as h:
        assert h["__src__/id"].asstr()[:].tolist() == ["first", "0", "1"]
    logs.add("2", {"loss": np.ones(1)})
    logs.close()
    with h5py.File(path, "r") as h:
        assert h["loss/refs"][3].tolist() == [5, 6]


def test_add_is_committed_at_exit(tmp_path):
    path = tmp_path / "exit.h5"
    code = (
        "import numpy as np, h5dask as h5m\n"
        "class L(h5m.TypedFile):\n    loss = h5m.Array()\n"
        f"f = L({str(path)!r}, 'w')\n"
        "for i in range(5):\n    f.add(str(i), {'loss': np.full(3, i, dtype=np.float32)})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with h5py.File(path, "r") as h:
        assert h["__src__/id"].asstr()[:].tolist() == ["0", "1", "2", "3", "4"]
        assert h["loss/values"][:].tolist() == [i for i in range(5) for _ in range(3)]
        assert h["loss/refs"][4].tolist() == [12, 15]


@pytest.mark.parametrize("keep_open", [False, True])
def test_keep_open_handles(exp, keep_open):
    exp.keep_open = keep_open
    assert not exp._handle.is_open
    assert exp.rows.get("1").shape == (2, 3)
    assert exp._handle.is_open is keep_open
    exp.rows[0] = np.full(3, 9.0)
    assert exp._handle.is_open is keep_open
    assert exp.rows[0].tolist() == [9.0] * 3
    h1, h2 = exp.handle(), exp.handle()
    assert (h1 is h2) is keep_open
    if not keep_open:
        h1.close()
        h2.close()
    exp.close()
    assert not exp._handle.is_open
    assert exp.rows.get("0").shape == (1, 3)  # reopens on demand after close
    assert exp._handle.is_open is keep_open
    exp.keep_open = False
    assert not exp._handle.is_open


def test_create_keep_open(tmp_path):
    f = Experiment.create(
        tmp_path / "k.h5", ["1"], scheduler="sync", progress=False, keep_open=True
    )
    assert f.keep_open
    assert f.rows.get("1").shape == (2, 3)
    assert f._handle.is_open  # opened on demand, then kept
    f.close()
    assert not f._handle.is_open


def test_context_manager_commits_and_closes(tmp_path):
    path = tmp_path / "ctx.h5"
    with h5m.TypedFile(path, mode="w", keep_open=True) as f:
        f.add("a", {"x": np.arange(3)})
        assert f._handle.is_open
    assert not f._handle.is_open
    with h5py.File(path, "r") as h:
        assert h["x/values"][:].tolist() == [0, 1, 2]


def test_pickling_reopens_in_the_same_process(exp):
    exp.keep_open = True
    exp.rows.get("0")
    copy = pickle.loads(pickle.dumps(exp))
    assert not copy._handle.is_open
    assert copy.ids.tolist() == exp.ids.tolist()
    assert np.array_equal(copy.rows.get("3"), exp.rows.get("3"))
    assert np.array_equal(copy.pair.get("2")["y"], exp.pair.get("2")["y"])
    proxy = pickle.loads(pickle.dumps(exp.rows))
    assert np.array_equal(proxy.get("5"), exp.rows.get("5"))


def _read_in_child(file):
    return file.ids.tolist(), file.rows.get("4").tolist(), file.nested.get("2")["q"]["y"].tolist()


def test_pickling_to_a_spawned_process(exp):
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        ids, rows, y = pool.apply(_read_in_child, (exp,))
    assert ids == exp.ids.tolist()
    assert rows == exp.rows.get("4").tolist()
    assert y == [2.0] * 3


def test_foreign_file_becomes_proxies(tmp_path):
    path = tmp_path / "foreign.h5"
    data = np.random.default_rng(0).normal(size=(10, 10))
    with h5py.File(path, "w") as h:
        h.create_dataset("g1/d1", data=data)
        h.create_dataset("g2/d2", data=data * 2)
        h["top"] = np.arange(5)
        h["g1"].attrs["meta"] = "x"
    f = h5m.TypedFile(path, mode="r")
    assert f.keys() == ["g1", "g2", "top"]
    assert isinstance(f.g1, h5m.GroupProxy) and isinstance(f.g1.d1, h5m.DatasetProxy)
    assert np.array_equal(f.g1.d1[()], data) and np.array_equal(f.g2.d2[2:4], data[2:4] * 2)
    assert np.array_equal(np.asarray(f.top), np.arange(5))
    assert f.g1.attrs == {"meta": "x"} and len(f) == 0
    assert set(f.features) == {"g1/d1", "g2/d2", "top"}
    with pytest.raises(h5m.H5DaskError, match="no ref table"):
        f.top.refs  # noqa: B018
    rw = h5m.TypedFile(path, mode="r+")
    rw.add("0", {"g3": {"d3": np.ones((1, 10))}})
    assert set(rw.get("0")) == {"g3"}
    assert isinstance(rw.g3, h5m.GroupProxy)
    with h5py.File(path, "r") as h:
        assert np.array_equal(h["g1/d1"][()], data)  # the foreign data is untouched
        assert h.attrs["format"] == "h5dask"


def test_in_memory_file(tmp_path):
    path = tmp_path / "mem.h5"
    f = h5m.TypedFile(path, mode="w", driver="core", backing_store=False)
    assert f._handle.is_open  # an in-memory file lives only in its handle
    f.add("0", {"ds": np.random.rand(3, 4, 5)})
    assert f.get("0")["ds"].shape == (3, 4, 5)
    assert f.ds.get(0).shape == (3, 4, 5)
    assert not path.exists()
    with pytest.raises(TypeError, match="memory"):
        pickle.dumps(f)
    f.close()
    assert not f._handle.is_open


def test_attrs_info_and_repr(exp, capsys):
    assert exp.rows.attrs == {"param1": 18, "param2": "hey", "param3": None}
    assert exp.attrs["format"] == "h5dask" and exp.attrs["format_version"] == 1
    assert repr(exp) == f"<Experiment {exp.filename!r} mode='r+'>"
    exp.info()
    out = capsys.readouterr().out
    assert "rows" in out and "nested/q/y" in out and "float32" in out
    assert "(3, 3)" in out  # the cell of id "2" in rows
    assert "<table>" in exp._repr_html_()


def test_custom_methods_and_transforms(exp):
    assert np.array_equal(exp.rows.custom_method(np.ones(3)), np.zeros(3))
    assert exp.rows.feature is Experiment.rows

    class Flat(Rows):
        __t__ = (lambda a: a.ravel(),)

    f = h5m.TypedFile.create(
        exp.filename + "2", ["2"], schema={"r": Flat()}, scheduler="sync", progress=False
    )
    assert f.r.get("2").shape == (9,)


def test_unknown_ids(exp):
    for call in (exp.get, exp.rows.get, exp.pair.get, exp.logs.get, exp.rows.refs.__getitem__):
        with pytest.raises(UnknownIdError, match="'nope'") as info:
            call("nope")
        assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownIdError):
        exp.rows.get(100)


def test_load_runs_the_schema_without_writing(exp):
    got = Experiment.load("2")
    assert set(got) == {"rows", "pair", "nested", "word", "doubled", "zeroed"}
    assert np.array_equal(got["doubled"], [4.0] * 3)
    assert Experiment.load("abc")["word"].tolist() == ["abc"]


def test_add_stores_what_was_added_even_if_the_caller_mutates_it_later(tmp_path):
    class Run(h5m.TypedFile):
        w = h5m.Array()

    weights = np.zeros(4)
    with Run(tmp_path / "run.h5", mode="w") as run:
        for epoch in range(3):
            weights += 1  # in place, as an optimiser step changes a model's tensors
            run.add(f"epoch-{epoch}", {"w": weights})
        assert run.w.get("epoch-0").tolist() == [1, 1, 1, 1]
    with h5py.File(tmp_path / "run.h5") as f:
        assert f["w/values"][:].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]


def test_occasional_adds_reach_the_disk_at_once_bursts_within_a_second(tmp_path):
    class Logs(h5m.TypedFile):
        loss = h5m.Array()

    def on_disk() -> list[str]:
        with h5py.File(tmp_path / "logs.h5", "r") as f:
            return f["__src__/id"].asstr()[:].tolist()

    logs = Logs(tmp_path / "logs.h5", mode="w")
    logs.add("epoch-0", {"loss": np.array([1.0])})
    assert on_disk() == ["epoch-0"]  # the first add in a while: committed at once
    writer = logs._get_writer()
    assert writer.flush_seconds == 1.0
    writer.flush_seconds = 3.0  # a margin against a slow machine, same mechanism
    logs.add("epoch-1", {"loss": np.array([0.5])})
    assert on_disk() == ["epoch-0"]  # a burst: buffered
    time.sleep(3.1)
    logs.add("epoch-2", {"loss": np.array([0.2])})
    assert on_disk() == ["epoch-0", "epoch-1", "epoch-2"]


@pytest.mark.parametrize("keep_open", [False, True])
def test_reads_between_adds_match_a_fresh_reopen(tmp_path, keep_open):
    """Commits update the cached index and ref tables in place; they must stay exact."""
    rng = np.random.default_rng(0)
    path = tmp_path / "logs.h5"
    logs = XY(path, mode="w", keep_open=keep_open)
    expected: dict[str, dict[str, list]] = {}
    for step in range(60):
        id = f"id-{rng.integers(40)}" if step % 3 else f"new-é-{step}"  # repeats: set()
        data = {"x": rng.random((int(rng.integers(1, 4)), 2))}
        if step % 4 == 0 or step > 40:  # y appears later, for some ids only
            data["y"] = np.full(int(rng.integers(1, 3)), step)
        if id in expected:
            logs.set(id, data)
        else:
            logs.add(id, data)
        expected.setdefault(id, {}).update({k: v.tolist() for k, v in data.items()})
        if step % 5 == 0:
            logs.flush()
        probe = list(expected)[int(rng.integers(len(expected)))]
        assert logs.x.get(probe).tolist() == expected[probe]["x"]  # a read commits, then caches
        assert sorted(logs.index) == sorted(expected)
    logs.close()
    fresh = XY(path, mode="r")
    assert list(fresh.index) == list(logs.index)
    for name in ("x", "y"):
        assert getattr(fresh, name).refs[:].tolist() == getattr(logs, name).refs[:].tolist()
    for id, features in expected.items():
        for name, value in features.items():
            assert getattr(fresh, name).get(id).tolist() == value, (id, name)


def test_fast_and_checked_adds_mix_in_order(tmp_path):
    """Runs of same-feature adds are buffered by column; anything else breaks the run."""
    logs = XY(tmp_path / "mix.h5", mode="w")
    logs._get_writer().flush_seconds = None
    expected = {}
    for k in range(300):
        x = np.full((k % 5 + 1 if k % 90 else 40, 3), k, dtype=np.float32)
        data = {"x": x}
        if k % 50 == 7:
            data = {"x": x.astype(np.int16)}  # safe cast: the checked path
        if k % 40 == 11:
            data = {"x": np.asfortranarray(x)}  # not C-contiguous: the checked path
        if k % 40 == 12:
            data = {"x": np.repeat(x, 2, axis=1)[:, ::2]}  # strided: the checked path
        if k % 70 == 3:
            data = {"x": x, "y": np.array([f"text {k}"])}  # another set of features
        logs.add(f"{k}", data)
        expected[f"{k}"] = x.tolist()
    with pytest.raises(ConcatError, match="'bad'.*'y'.*float64"):  # y holds strings
        logs.add("bad", {"x": np.zeros((2, 3), np.float32), "y": np.zeros(2)})
    with pytest.raises(ConcatError, match="'bad'.*'x'.*shape"):
        logs.add("bad", {"x": np.zeros((2, 4), np.float32)})  # known feature, wrong shape
    with pytest.raises(ConcatError, match="'bad'.*'x'.*float64"):
        logs.add("bad", {"x": np.zeros((2, 3))})  # float64 does not cast safely
    logs.close()
    with h5py.File(tmp_path / "mix.h5") as f:
        ids = f["__src__/id"].asstr()[:].tolist()
        assert ids == list(expected)
        values, refs = f["x/values"][:], f["x/refs"][:]
        for position, id in enumerate(ids):
            start, stop = refs[position]
            assert values[start:stop].tolist() == expected[id]
        assert f["y/values"].asstr()[:].tolist() == [f"text {k}" for k in range(3, 300, 70)]


@pytest.mark.parametrize("dtype", [np.float64, np.int16], ids=["fast", "checked"])
def test_a_forked_child_does_not_commit_its_parents_buffered_adds(tmp_path, dtype):
    path = tmp_path / "fork.h5"
    logs = XY(path, mode="w")
    logs.add("parent-0", {"x": np.zeros(1)})
    logs._get_writer().flush_seconds = None
    # buffered when the child forks: by add's fast path, or by the checked one (a cast)
    logs.add("parent-1", {"x": np.zeros(1, dtype=dtype)})
    context = multiprocessing.get_context("fork")
    child = context.Process(target=_add_in_child, args=(logs,))
    child.start()
    child.join(60)
    assert child.exitcode == 0  # its add was refused: the parent writes the file
    logs.close()
    with h5py.File(path) as f:
        assert f["__src__/id"].asstr()[:].tolist() == ["parent-0", "parent-1"]


def _add_in_child(logs) -> None:
    try:
        logs.add("child", {"x": np.ones(1)})
    except FileLockedError:
        logs.close()
        os._exit(0)
    os._exit(1)


def test_an_add_never_replaces_data_and_a_refused_add_keeps_the_ones_before(tmp_path):
    """Committed or buffered (by the fast path or the checked one), data is never replaced
    by add: the add raises naming id and feature, buffers nothing, and the adds buffered
    before it are committed. set() replaces; features an id has no data in stay addable."""
    logs = XY(tmp_path / "twice.h5", mode="w")
    logs.add("first", {"x": np.zeros(2)})  # committed at once: the index is cached
    logs._get_writer().flush_seconds = None
    logs.add("a", {"x": np.full(2, 1)})
    logs.add("é", {"x": np.full(2, 2)})  # buffered, in a run of the fast path
    logs.add("s", {"x": np.full(2, 3, np.int16)})  # buffered by the checked path (a cast)
    for id in ["a", "first", "é", "s"]:
        with pytest.raises(OverwriteError) as info:
            logs.add(id, {"y": np.full(1, 9), "x": np.full(2, 9)})
        assert (info.value.source, info.value.feature) == (id, "x")
        assert "set()" in str(info.value) and "append()" in str(info.value)
    with pytest.raises(ConcatError, match="'b'.*'x'"):  # a misfit keeps the adds before too
        logs.add("b", {"x": np.zeros((1, 2))})
    assert logs._get_writer().pending == 3  # nothing of the refused adds was buffered
    logs.add("a", {"y": np.full(1, 7)})  # a feature "a" has no data in yet
    logs.x.set("first", np.full(2, 4))  # replaced on purpose
    logs.close()
    fresh = XY(tmp_path / "twice.h5", mode="r")
    assert list(fresh.index) == ["first", "a", "é", "s"]
    assert [fresh.x.get(id).tolist() for id in fresh.index] == [[4, 4], [1, 1], [2, 2], [3, 3]]
    assert [fresh.y.get(id) is None for id in fresh.index] == [True, False, True, True]
    assert fresh.y.get("a").tolist() == [7]


def test_append_grows_an_ids_arrays_in_place_or_moves_them_whole(tmp_path):
    """A per-step log: rows appended to an id, buffered, before and after commits, by the
    file, a group and a feature; the region that ends its dataset grows in place, another
    one moves to the end with its old rows."""

    class Run(h5m.TypedFile):
        logs = h5m.Group(loss=h5m.Array(), note=h5m.Array())

    path = tmp_path / "run.h5"
    run = Run(path, mode="w")
    expected: dict[str, list[float]] = {"train": [], "val": []}
    for step in range(40):
        run.logs.append("train", {"loss": step / 10})
        expected["train"].append(step / 10)
        if step % 7 == 3:
            run.logs.loss.append("val", np.array([step, -step], dtype=float))
            expected["val"] += [step, -step]
        if step % 9 == 8:
            run.flush()
            assert run.logs.loss.get("train").tolist() == expected["train"]
    run.append("train", {"logs": {"note": "done"}})  # a feature the id had no data in
    with pytest.raises(OverwriteError):
        run.logs.add("train", {"loss": np.zeros(1)})
    run.close()
    fresh = Run(path, mode="r")
    assert fresh.ids.tolist() == ["train", "val"]
    assert fresh.logs.loss.get("train").tolist() == expected["train"]
    assert fresh.logs.loss.get("val").tolist() == expected["val"]
    assert fresh.logs.note.get("train").tolist() == ["done"]
    regions = fresh.logs.loss.refs.array
    assert (regions[:, 1] - regions[:, 0]).tolist() == [40, len(expected["val"])]
    assert regions[:, 1].max() == len(fresh.logs.loss)  # the last region ends the dataset


def test_reaching_a_group_commits_nothing_and_reads_see_buffered_writes(tmp_path):
    logs = XY(tmp_path / "reach.h5", mode="w")
    logs.add("first", {"x": np.zeros(2)})  # committed at once
    logs._get_writer().flush_seconds = None
    for k in range(5):
        logs.root.add(f"id-{k}", {"x": np.full(2, k)})
        logs.x.add(f"x-{k}", np.full(2, k))
        logs.add(f"z-{k}", {"z": np.full(1, k)})  # a feature neither declared nor committed
        assert "z" in logs.keys() and logs.z.path == "z"
    assert logs._get_writer().pending == 15  # reaching x, z and the root committed nothing
    assert logs.z.get("z-3").tolist() == [3]  # a read commits first
    assert logs._get_writer().pending == 0


def test_an_add_that_fails_on_its_second_feature_buffers_nothing(tmp_path):
    """The fast path copies feature by feature: a later misfit takes back the earlier copies."""
    logs = XY(tmp_path / "take-back.h5", mode="w")
    logs._get_writer().flush_seconds = None
    for k in range(3):  # a run of {x, y}: the fast path
        logs.add(f"ok-{k}", {"x": np.full(2, k), "y": np.full((1, 2), k, np.float32)})
    with pytest.raises(ConcatError, match="'bad'.*'y'.*shape"):
        logs.add("bad", {"x": np.full(2, 9), "y": np.full((1, 3), 9, np.float32)})
    logs.add("ok-3", {"x": np.full(2, 3), "y": np.full((1, 2), 3, np.float32)})
    logs.close()
    with h5py.File(tmp_path / "take-back.h5") as f:
        assert f["__src__/id"].asstr()[:].tolist() == ["ok-0", "ok-1", "ok-2", "ok-3"]
        assert f["x/values"][:].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert f["y/values"][:, 0].tolist() == [0, 1, 2, 3]


def test_a_run_whose_first_add_fails_commits_nothing_and_takes_the_next_adds(tmp_path):
    """After a commit, the next add opens a new run of the fast path; if that add does not
    fit, the empty run must neither make a commit of its own nor lose the adds after it."""
    path = tmp_path / "first-fails.h5"
    logs = XY(path, mode="w")
    logs.add("ok-0", {"x": np.full(2, 0), "y": np.full((1, 2), 0, np.float32)})
    logs.flush()
    logs._get_writer().flush_seconds = None
    with pytest.raises(ConcatError, match="'bad'.*'x'.*shape"):
        logs.add("bad", {"x": np.full((3, 2), 9), "y": np.full((1, 2), 9, np.float32)})
    assert logs._writer.pending == 0
    last_commit = logs._writer._last_flush
    logs._writer.flush()
    assert logs._writer._last_flush == last_commit  # no empty commit
    for k in (1, 2):
        logs.add(f"ok-{k}", {"x": np.full(2, k), "y": np.full((1, 2), k, np.float32)})
    assert logs._writer.pending == 2
    logs.close()
    with h5py.File(path) as f:
        assert f["__src__/id"].asstr()[:].tolist() == ["ok-0", "ok-1", "ok-2"]
        assert f["x/values"][:].tolist() == [0, 0, 1, 1, 2, 2]


class Packed(h5m.TypedFile):
    raw = h5m.Array()
    packed = h5m.Array(compression="gzip")


@pytest.mark.parametrize("h5_kwargs", [{}, {"rdcc_nbytes": 1 << 16}])
def test_kept_readers_cache_only_filtered_chunks_unless_told(tmp_path, h5_kwargs):
    """A random read of one item copies a whole chunk through HDF5's cache: unfiltered
    chunks are read without one, compressed ones keep it; a set cache size is kept."""
    rng = np.random.default_rng(0)
    data = {str(k): rng.random((16, 16), dtype=np.float32) for k in range(300)}
    with Packed(tmp_path / "p.h5", mode="w") as f:
        for id, x in data.items():
            f.add(id, {"raw": x, "packed": x + 1})
    f = Packed(tmp_path / "p.h5", mode="r", keep_open=True, **h5_kwargs)
    for id in rng.permutation(list(data))[:50]:
        assert np.array_equal(f.raw.get(id), data[id])
        assert np.array_equal(f.packed.get(id), data[id] + 1)
    cache = {
        name: f._handle.reader(f"{name}/values").id.get_access_plist().get_chunk_cache()[1]
        for name in ("raw", "packed")
    }
    f.close()
    default = h5py.h5p.create(h5py.h5p.FILE_ACCESS).get_cache()[2]
    if h5_kwargs:
        assert cache == {"raw": 1 << 16, "packed": 1 << 16}
    else:
        assert cache == {"raw": 0, "packed": default} and default > 0


def test_a_file_created_and_kept_open_has_no_chunk_cache_either(tmp_path):
    f = Packed(tmp_path / "k.h5", mode="w", keep_open=True)
    f.add("a", {"raw": np.zeros((2, 3), np.float32), "packed": np.ones((2, 3), np.float32)})
    assert f._handle._cached().id.get_access_plist().get_cache()[2] == 0
    assert f.raw.get("a").tolist() == [[0, 0, 0], [0, 0, 0]]
    f.close()


FILE_API = sorted({n for n in dir(h5m.TypedFile) if not n.startswith("_")} | {"filename", "schema"})
GROUP_API = sorted(
    {n for n in dir(h5m.proxy.GroupProxy) if not n.startswith("_")} | {"file", "path", "feature"}
)


@pytest.mark.parametrize("name", FILE_API)
def test_feature_names_that_hide_the_files_api_are_refused(tmp_path, name):
    """A feature `index` made len(f) the rows of that feature and f.get(id) fail."""
    with pytest.raises(SchemaError, match=f"Exp: a feature named '{name}' would hide TypedFile"):
        type("Exp", (h5m.TypedFile,), {name: h5m.Array()})
    with pytest.raises(SchemaError, match=f"TypedFile: a feature named '{name}' would hide"):
        h5m.TypedFile(tmp_path / "a.h5", mode="w", schema={name: h5m.Array()})
    with pytest.raises(SchemaError, match=f"'{name}' would hide TypedFile.{name}"):
        h5m.TypedFile.create(tmp_path / "b.h5", ["0"], schema={name: h5m.Array()})
    assert not (tmp_path / "b.h5").exists()


@pytest.mark.parametrize("name", GROUP_API)
def test_group_members_that_hide_the_groups_api_are_refused(tmp_path, name):
    assert {"add", "attrs", "children", "get", "keys", "name", "set"} <= set(GROUP_API)
    with pytest.raises(SchemaError, match=f"Exp: Group member data/{name} would hide"):
        type("Exp", (h5m.TypedFile,), {"data": h5m.Group(**{name: h5m.Array()})})
    nested = h5m.Group(sub=h5m.Group(**{name: h5m.Array()}))
    with pytest.raises(SchemaError, match=f"Group member logs/sub/{name} .*file.logs.sub.{name}"):
        h5m.TypedFile(tmp_path / "f.h5", mode="w", schema={"logs": nested})


@pytest.mark.parametrize("name", ["a/b", "..", ".", ""])
def test_group_members_and_features_named_like_paths_are_refused(tmp_path, name):
    with pytest.raises(SchemaError, match=f"Group member {name!r} cannot name a feature"):
        h5m.Group(**{name: h5m.Array()})
    with pytest.raises(SchemaError, match=f"{name!r} cannot name a feature"):
        h5m.TypedFile(tmp_path / "f.h5", mode="w", schema={name: h5m.Array()})


def test_a_mixins_api_is_kept_and_h5mappers_names_stay_allowed(tmp_path):
    class Mixin:
        def describe(self):
            return "mixin"

    with pytest.raises(SchemaError, match="a feature named 'describe' would hide .*Mixin.describe"):
        type("Exp", (h5m.TypedFile, Mixin), {"describe": h5m.Array()})

    class Exp(h5m.TypedFile, Mixin):  # h5mapper's README and examples' names
        data = h5m.Group(images=h5m.Array(), labels=h5m.Array())
        logs = h5m.Group(loss=h5m.Array(), acc=h5m.Array())
        ckpts = h5m.Array()
        x, y, z, feat, name, path, shape = (h5m.Array() for _ in range(7))

    with Exp(tmp_path / "e.h5", mode="w") as f:
        f.add("0", {"data": {"images": np.zeros((1, 2))}, "name": np.array([3])})
        f.add("1", {"logs": {"loss": np.ones(4)}})
    f = Exp(tmp_path / "e.h5")
    assert len(f) == 2 and f.get("0")["name"].tolist() == [3]
    assert f.data.images.get("0").shape == (1, 2) and f.logs.get("1")["loss"].shape == (4,)
    assert f.describe() == "mixin" and f.name.get("0").tolist() == [3]
