"""Proxies: dataset and group proxies, ref tables, h5py items, set and add through them."""

from __future__ import annotations

import numpy as np
import pytest

import h5dask as h5m


class Randn(h5m.Feature):
    __re__ = r"^\d+$"

    def load(self, source):
        return np.random.default_rng(int(source)).normal(size=(4, 12))

    def custom_method(self, inputs):
        return np.zeros_like(inputs)


class Pair(h5m.Feature):
    def load(self, source):
        rng = np.random.default_rng(int(source))
        return {"x": rng.normal(size=(4, 12)), "y": rng.normal(size=(4, 12))}


class File(h5m.TypedFile):
    x = Randn()
    d = Pair()


@pytest.fixture
def f(tmp_path):
    return File.create(
        tmp_path / "p.h5", [str(i) for i in range(8)], scheduler="sync", progress=False
    )


def test_dataset_proxy_attributes(f):
    x = f.get_proxy("x")
    assert x == f.x and isinstance(x, h5m.DatasetProxy)
    assert x.file is f and x.feature is File.x and x.has_refs
    assert x.values_path == "x/values" and x.name == "/x"
    assert x.shape == (32, 12) and x.ndim == 2 and x.size == 32 * 12
    assert x.dtype == np.float64 and x.chunks[1:] == (12,)
    assert np.array_equal(x.custom_method(np.ones(3)), np.zeros(3))
    assert repr(x).startswith("<Proxy feature /x shape=(32, 12)")  # "Proxy", as in h5mapper
    assert f.features["x"] == x and set(f.features) == {"x", "d/x", "d/y"}


def test_ref_table(f):
    refs = f.x.refs
    assert len(refs) == 8
    assert refs[0] == slice(0, 4) and refs[-1] == slice(28, 32) and refs["3"] == slice(12, 16)
    table = refs.array
    assert table.dtype == np.int64 and table.shape == (8, 2)
    assert np.array_equal(np.asarray(refs), table)
    assert list(refs)[2] == slice(8, 12)
    assert refs[1:3].tolist() == [slice(4, 8), slice(8, 12)]  # slices, as refs[i] gives
    assert refs.array is f.x.refs.array  # cached between calls
    assert np.array_equal(f.x[refs[5]], Randn().load("5"))


@pytest.mark.parametrize("keep_open", [False, True])
def test_h5py_items_and_setitem(f, keep_open):
    f.keep_open = keep_open
    x = f.x
    assert np.array_equal(x[:], np.concatenate([Randn().load(str(i)) for i in range(8)]))
    assert x[0].shape == (12,) and x[0, 3] == x[:][0, 3]
    before = x[0]
    x[0] = before + 1
    assert np.allclose(x[0], before + 1)
    before = x[:5]
    x[:5] = before + 1
    assert np.allclose(x[:5], before + 1)
    indices = np.array([0, 2, 5, 12])
    before = x[indices]
    x[indices] = before + 1
    assert np.allclose(x[indices], before + 1)
    assert np.allclose(np.asarray(x), x[()])
    assert f._handle.is_open is keep_open


@pytest.mark.parametrize("keep_open", [False, True])
def test_dataset_get_set_add(f, keep_open):
    f.keep_open = keep_open
    x = f.x
    new = np.ones((2, 12))
    x.add("21", new)
    assert np.array_equal(x.get("21"), new)
    x.set("21", new + 2)
    assert np.array_equal(x.get("21"), new + 2)
    assert x.refs["21"] == slice(32, 34)  # same length: rewritten in place
    x.set("21", np.zeros((5, 12)))
    assert x.refs["21"] == slice(34, 39) and np.array_equal(x["21"], np.zeros((5, 12)))
    x["22"] = np.full((1, 12), 3.0)  # a str item is an id
    assert x.get("22")[0, 0] == 3.0 and f.d.get("22") == {}
    assert x.ids.tolist()[-2:] == ["21", "22"] and f.d.x.ids.tolist() == [str(i) for i in range(8)]
    with pytest.raises(TypeError, match="array feature"):
        x.set("0", {"a": np.zeros(1)})
    assert f._handle.is_open is keep_open


@pytest.mark.parametrize("keep_open", [False, True])
def test_group_proxy_from_a_dict_feature(f, keep_open):
    f.keep_open = keep_open
    d = f.d
    assert isinstance(d, h5m.GroupProxy) and d.feature is File.d
    assert d.keys() == ["x", "y"] and "x" in d and list(d) == ["x", "y"]
    assert isinstance(d.x, h5m.DatasetProxy) and d.children["y"] == d.y
    got1, got2 = d["0"], d.get("0")
    assert np.array_equal(got1["x"], got2["x"]) and np.array_equal(got1["y"], Pair().load("0")["y"])
    before = d["0"]
    before["x"] = before["x"] + 1
    d["0"] = before
    assert np.allclose(d["0"]["x"], before["x"])
    d.set("10", before)
    assert np.allclose(d["10"]["y"], before["y"])
    val = Pair().load("3")
    d.add("8", val)
    assert np.array_equal(d["8"]["x"], val["x"])
    val["z"] = val.pop("y")
    d.add("9", val)  # a new member
    assert set(d["9"]) == {"x", "z"} and isinstance(d.z, h5m.DatasetProxy)
    assert "z" in repr(d) and repr(d).startswith("<Proxy group /d [x, y, z]")
    assert f._handle.is_open is keep_open
    with pytest.raises(TypeError, match="dict"):
        d.set("0", np.zeros(1))


def test_dict_of_dicts_proxies(tmp_path):
    class DictOfDict(h5m.Feature):
        def load(self, source):
            return {"p": {"x": np.zeros((4, 12)), "y": np.ones(2)}, "q": {"x": np.ones(3)}}

    f = h5m.TypedFile.create(
        tmp_path / "dd.h5", ["0", "1"], schema={"d": DictOfDict()}, scheduler="sync", progress=False
    )
    assert isinstance(f.d.p, h5m.GroupProxy) and isinstance(f.d.p.x, h5m.DatasetProxy)
    assert f.get_proxy("d/q/x") == f.d.q.x
    got = f.d["1"]
    assert got["p"]["x"].shape == (4, 12) and got["q"]["x"].tolist() == [1.0] * 3
    got["p"]["x"] = got["p"]["x"] + 1
    f.d.set("1", got)
    assert np.array_equal(f.d["1"]["p"]["x"], np.ones((4, 12)))
    f.d.p.add("2", {"x": np.ones((1, 12))})
    assert set(f.d["2"]) == {"p"} and f.d.q.get("2") == {}


def test_group_of_features_and_grp_transforms(tmp_path):
    class Summed(h5m.Feature):
        __grp_t__ = (lambda data: {**data, "total": sum(v.sum() for v in data.values())},)

        def load(self, source):
            return {"a": np.ones(2), "b": np.ones(3)}

    class F(h5m.TypedFile):
        g = h5m.Group(s=Summed(), r=Randn())

    f = F.create(tmp_path / "g.h5", ["1", "z"], scheduler="sync", progress=False)
    assert f.g.keys() == ["s", "r"]
    assert f.g.s.get("1")["total"] == 5.0
    assert set(f.g.get("z")) == {"s"}  # r's __re__ skips "z"
    assert f.g.r.get("z") is None


def test_declared_feature_without_data(tmp_path):
    class F(h5m.TypedFile):
        a = h5m.Array()
        b = h5m.Array()

    f = F(tmp_path / "e.h5", mode="w")
    assert not f.a.exists and f.a.shape == (0,)
    with pytest.raises(IndexError, match="no data"):
        f.a[0]  # noqa: B018
    f.b.add("0", np.ones(2))
    assert f.a.get("0") is None and f.a.refs.array.tolist() == [[-1, -1]]
    assert f.get_proxy("") == f.root
    with pytest.raises(KeyError, match="nothing"):
        f.get_proxy("nothing")
    with pytest.raises(AttributeError, match="nothing"):
        f.nothing  # noqa: B018
