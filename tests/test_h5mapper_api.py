"""h5mapper 0.3.3's public names and the proxy and file attributes its code touches.

Written from h5mapper's documented behaviour and source (its modules' ``__all__``,
``Proxy``, ``TypedFile``, ``FileWalker``, ``utils``, ``serve``).
"""

from __future__ import annotations

import os
import re

import h5py
import numpy as np
import pytest
import torch

import h5dask as h5m
from h5dask.errors import ReadOnlyError, UnknownIdError

# the __all__ of each module of h5mapper 0.3.3, internals (_create, _compute, _load, _add) aside
H5MAPPER_ALL = {
    "core": ["as_temp", "in_mem", "TypedFile", "Proxy", "typedfile"],
    "create": ["for_each", "tqdm"],
    "crud": ["apply_and_store", "NP_KEY", "SRC_KEY", "REF_KEY", "null_regref"],
    "features": ["Feature", "Array", "Group", "TensorDict", "VShape"],
    "file_walker": ["FileWalker"],
    "serve": [
        "Setter",
        "Getter",
        "AsSlice",
        "AsFramedSlice",
        "GetId",
        "Input",
        "Target",
        "process_batch",
        "ProgrammableDataset",
    ],
    "utils": ["depth_first_apply", "flatten_dict"],
}


class Randn(h5m.Feature):
    def load(self, source):
        return np.random.default_rng(int(source)).standard_normal((4, 3))


class Words(h5m.Feature):
    __ds_kwargs__ = dict(dtype=h5py.string_dtype(encoding="utf-8"))

    def load(self, source):
        return np.array([f"w{source}", "é"])


class Data(h5m.TypedFile):
    x = Randn()
    words = Words()
    logs = h5m.Group(loss=h5m.Array())


@pytest.fixture
def data(tmp_path):
    f = Data.create(tmp_path / "d.h5", [str(i) for i in range(6)], scheduler="sync", progress=False)
    f.logs.add("train", {"loss": np.zeros(10)})
    return f


@pytest.mark.parametrize("module", list(H5MAPPER_ALL))
def test_every_public_name_of_h5mapper_is_at_the_top_level(module):
    missing = [name for name in H5MAPPER_ALL[module] if not hasattr(h5m, name)]
    assert not missing, f"h5mapper.{module} names missing from h5dask: {missing}"
    assert set(H5MAPPER_ALL[module]) <= set(h5m.__all__)


def test_features_and_constants():
    assert h5m.TensorDict is h5m.features.TensorDict and h5m.VShape is h5m.features.VShape
    assert h5m.SRC_KEY == "__src__" and h5m.null_regref is None
    assert (h5m.NP_KEY, h5m.REF_KEY) == ("values", "refs")  # h5dask's names of those datasets


def test_constants_name_the_file_layout(data):
    with h5py.File(data.filename, "r") as f:
        assert f[h5m.SRC_KEY]["id"].asstr()[:].tolist() == [str(i) for i in range(6)] + ["train"]
        assert f["x"][h5m.NP_KEY].shape == (24, 3) and f["x"][h5m.REF_KEY].shape == (7, 2)


# -- files -------------------------------------------------------------------------------------


def test_as_temp_in_mem_and_typedfile(tmp_path):
    path = h5m.as_temp("train.h5")
    assert os.path.basename(path) == "train.h5" and os.path.isdir(os.path.dirname(path))
    assert not os.path.exists(path)
    Logs = h5m.typedfile("Logs", {"loss": h5m.Array(), "acc": h5m.Array()})
    assert issubclass(Logs, h5m.TypedFile) and Logs.__name__ == "Logs"
    logs = h5m.in_mem(Logs)
    logs.add("a", {"loss": np.arange(3.0), "acc": np.ones(2)})
    assert np.array_equal(logs.loss.get("a"), np.arange(3.0)) and logs.keep_open
    assert not os.path.exists(logs.filename)  # in memory only
    other = h5m.in_mem(Logs)
    assert other.filename != logs.filename and len(other) == 0


def test_file_walker(tmp_path):
    (tmp_path / "sub").mkdir()
    for d in ["", "sub"]:
        for name in ["a.ext", "a.null", "b.ext", ".hidden.ext"]:
            (tmp_path / d / name).write_text(" ")
    found = list(h5m.FileWalker(r"ext$", str(tmp_path)))
    assert len(found) == 4 and all(os.path.isabs(p) and p.endswith(".ext") for p in found)
    assert sum("sub" in p for p in found) == 2
    assert list(h5m.FileWalker(r"ext$", str(tmp_path / "a.ext"))) == [str(tmp_path / "a.ext")]
    both = h5m.FileWalker(r"ext$", [tmp_path / "sub", str(tmp_path / "b.ext")])
    assert len(list(both)) == 3 and list(both) == list(both)  # iterates again
    assert len(list(h5m.FileWalker(r"sub", str(tmp_path)))) == 3  # the directory matches
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        list(h5m.FileWalker(r"ext", missing))
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        list(h5m.FileWalker(r"ext", [str(tmp_path / "a.ext"), missing]))


def test_typed_file_attributes(data, tmp_path):
    assert list(data.__src__.id) == [str(i) for i in range(6)] + ["train"]
    assert data.__src__.id[data.x.refs[()].astype(bool)].tolist() == [str(i) for i in range(6)]
    assert data.f_ is None  # no handle kept
    data.keep_open = True
    data.x[0]  # noqa: B018
    assert isinstance(data.f_, h5py.File) and data.f_.mode == "r"
    data.close()
    assert data.f_ is None
    assert data.open("r") is data and data.mode == "r"
    with pytest.raises(ReadOnlyError):
        data.x[0] = np.zeros(3)
    data.open("r+")
    data.x[0] = np.zeros(3)
    assert np.array_equal(data.x[0], np.zeros(3))
    data.close()  # its kept handle holds the write lock
    with Data(data.filename, "r+") as f:
        f.logs.add("more", {"loss": np.ones(2)})
    assert np.array_equal(Data(data.filename).logs.loss.get("more"), np.ones(2))


# -- proxies -----------------------------------------------------------------------------------


def test_proxy_attributes(data):
    x, logs = data.x, data.logs
    assert isinstance(x, h5m.Proxy) and isinstance(logs, h5m.Proxy)
    assert x.owner is data and logs.owner is data and x.feature is Data.x
    assert "Proxy" in repr(x) and "Proxy" in repr(logs)
    assert not x.is_group and logs.is_group and data.logs.loss.is_group is False
    assert x.sources.tolist() == [str(i) for i in range(6)]
    assert logs.sources.tolist() == ["train"] and logs.loss.sources.tolist() == ["train"]
    h = x.handle()
    try:
        assert isinstance(h, h5py.File) and h.filename == data.filename
    finally:
        h.close()
    ds = x.h5_
    assert isinstance(ds, h5py.Dataset) and ds.shape == (24, 3)
    assert np.array_equal(ds[4:8], x[x.refs[1]])
    ds.file.close()
    grp = logs.h5_
    assert isinstance(grp, h5py.Group) and "loss" in grp
    grp.file.close()


def test_refs_items_are_slices_or_none(data):
    refs = data.logs.loss.refs
    everything = refs[()]
    assert everything.dtype == object and everything.tolist() == [None] * 6 + [slice(0, 10)]
    assert refs[:].tolist() == everything.tolist() and refs[5:].tolist() == [None, slice(0, 10)]
    assert refs[()].astype(bool).tolist() == [False] * 6 + [True]
    assert sum(data.x.refs[()].astype(bool)) == 6  # h5mapper's count of ids with data


def test_iset_writes_within_the_region(data):
    loss = data.logs.loss
    loss.iset("train", 3, 1.5)
    loss.iset("train", -1, 9.0)
    loss.iset("train", slice(5, 7), [2.0, 3.0])
    loss.iset("train", np.array([0, 1]), [7.0, 8.0])
    assert loss.get("train").tolist() == [7, 8, 0, 1.5, 0, 2, 3, 0, 0, 9]
    data.logs.iset("train", 4, {"loss": 4.0})
    assert loss.get("train")[4] == 4.0
    with pytest.raises(IndexError, match=r"row 10 is outside the 10 rows of 'train'"):
        loss.iset("train", 10, 0.0)
    with pytest.raises(IndexError, match=r"'0' has no data in feature 'logs/loss'"):
        loss.iset("0", 0, 0.0)
    with pytest.raises(UnknownIdError, match="nope"):
        loss.iset("nope", 0, 0.0)
    assert len(loss) == 10  # nothing appended


def test_asstr(data):
    words = data.words
    assert words.asstr() is words and words.asstr()[:4].tolist() == ["w0", "é", "w1", "é"]
    with pytest.raises(TypeError, match="'x' holds float64, not strings"):
        data.x.asstr()


@pytest.mark.parametrize("parallelism", ["mp", "threads", "none"])
def test_compute(data, tmp_path, parallelism):
    got = data.x.compute({"mean": np.mean, "rows": len}, n_workers=2, parallelism=parallelism)
    assert sorted(got) == [str(i) for i in range(6)]
    assert got["3"]["rows"] == 4 and np.isclose(got["3"]["mean"], data.x.get("3").mean())
    if parallelism == "threads":
        dest = Data(tmp_path / "dest.h5", mode="w")
        out = data.x.compute({"stats/max": np.max}, 2, "threads", destination=dest)
        assert out is dest and np.isclose(
            dest.get_proxy("stats/max").get("2"), data.x.get("2").max()
        )
    with pytest.raises(ValueError, match="parallelism"):
        data.x.compute({"m": np.mean}, parallelism="gpu")


def test_flush_close_and_serve_reach_the_file(data):
    data.keep_open = True
    data.logs.add("later", {"loss": np.ones(3)})
    data.logs.flush()
    assert Data(data.filename).logs.loss.get("later").tolist() == [1.0, 1.0, 1.0]
    data.x.close()
    assert data.f_ is None
    loader = data.x.serve({"x": h5m.Input(key="x", getter=h5m.GetId())}, batch_size=3)
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert [b["x"].shape for b in loader] == [(3, 4, 3), (3, 4, 3)]


def test_serve_sampling_jitter(tmp_path):
    f = h5m.TypedFile(tmp_path / "sig.h5", "w", schema={"sig": h5m.Array()})
    f.add("s", {"sig": np.arange(100.0)})
    batch = {"w": h5m.Input(key="sig", getter=h5m.AsSlice(shift=0, length=10, downsampling=10))}
    plain = h5m.ProgrammableDataset(f, batch)
    assert [plain[i]["w"][0] for i in range(len(plain))] == [10.0 * i for i in range(10)]
    ds = h5m.ProgrammableDataset(f, batch, sampling_jitter=3)
    starts = {ds[i]["w"][0] - 10 * i for i in range(1, 9) for _ in range(20)}
    assert starts <= set(range(-3, 3)) and len(starts) > 1  # moved, by at most the jitter
    edges = [ds[i]["w"] for i in (0, 9) for _ in range(20)]
    assert all(len(w) == 10 and 0 <= w[0] and w[-1] <= 99 for w in edges)  # kept in the data
    many = ds.__getitems__(list(range(10)))
    assert all(np.array_equal(m["w"], np.arange(m["w"][0], m["w"][0] + 10)) for m in many)
    loader = f.serve(batch, sampling_jitter=3, batch_size=5)
    assert loader.dataset.jitter == 3
    with pytest.raises(ValueError, match="sampling_jitter"):
        h5m.ProgrammableDataset(f, batch, sampling_jitter=-1)


# -- helpers -----------------------------------------------------------------------------------


def test_dict_helpers():
    nested = {"a": {"b": 1, "c": {"d": 2}}, "e": 3}
    assert h5m.flatten_dict(nested) == {"a/b": 1, "a/c/d": 2, "e": 3}
    assert h5m.flatten_dict(nested, separator=".", prefix="p") == {
        "p.a.b": 1,
        "p.a.c.d": 2,
        "p.e": 3,
    }
    assert h5m.flatten_dict(5, prefix="k") == {"k": 5}
    assert h5m.depth_first_apply(nested, lambda v: v * 10) == {
        "a": {"b": 10, "c": {"d": 20}},
        "e": 30,
    }


def test_process_batch_and_setter():
    batch = {"x": [h5m.Input(key="x"), "tag"], "y": (h5m.Target(key="y"),)}
    keys = h5m.process_batch(batch, lambda o: isinstance(o, h5m.Input), lambda o: o.key)
    assert keys == {"x": ["x", "tag"], "y": ["y"]}
    out = np.zeros((2, 6))
    setter = h5m.Setter(dim=1)
    assert setter(out, 1, np.ones((2, 3))) == 3 and out[:, 1:4].all() and out.sum() == 6
    assert h5m.Setter(after_item=False)(out, 2, np.full((2, 6), 5.0)) == 2
    assert (out == 5).all()


def test_setter_writes_a_feature(data):
    item = h5m.Target(key=data.logs.loss, setter=h5m.Setter())
    assert item.setter(item, 2, np.array([4.0, 5.0])) == 2
    assert data.logs.loss[:5].tolist() == [0, 0, 4, 5, 0]


@pytest.mark.parametrize("parallelism", ["mp", "threads", "none"])
def test_for_each(parallelism):
    got = list(
        h5m.for_each(list(range(7)), lambda v: v * v, parallelism, n_workers=2, disable=True)
    )
    assert got == [v * v for v in range(7)]
    with pytest.raises(ValueError, match="parallelism"):
        list(h5m.for_each([1], abs, parallelism="gpu"))


def test_apply_and_store(data):
    src, out = h5m.apply_and_store("2", {"n": len, "sum": np.sum}, data.x)
    assert src == "2" and out["n"] == 4 and np.isclose(out["sum"], data.x.get("2").sum())
