"""Serving to PyTorch: ProgrammableDataset, serve() and TypedFile Datasets in real DataLoaders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import h5dask as h5m
from h5dask.serve import ProgrammableDataset

N_IDS, SIGNAL = 60, 3000
ROOT = Path(__file__).resolve().parents[1]


class Data(h5m.TypedFile):
    x = h5m.Array()
    y = h5m.Array()
    sig = h5m.Array()


class DS(Data, Dataset):
    """A typed file that is a torch Dataset: sample i is (pid, id i's label, row i of x)."""

    def __getitem__(self, i):
        return os.getpid(), self.y.get(int(i)), self.x[int(i)]

    def __len__(self):
        return 40


def x_of(k: int) -> np.ndarray:
    return (k * 100 + np.arange(12, dtype="f4")).reshape(4, 3)


@pytest.fixture(scope="module")
def path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("serve") / "data.h5")
    with Data(path, mode="w") as f:
        for k in range(N_IDS):
            data = {"y": np.array([k])}
            if k % 5 != 3:  # ids without x: GetId skips them
                data["x"] = x_of(k)
            f.add(str(k), data)
        f.add("sig", {"sig": np.arange(SIGNAL, dtype="f8")})
    return path


GETTERS = {
    "Getter": ("x", h5m.Getter()),
    "GetId": ("x", h5m.GetId()),
    "AsSlice": ("sig", h5m.AsSlice(shift=3, length=40, downsampling=7)),
    "AsFramedSlice": (
        "sig",
        h5m.AsFramedSlice(
            shift=1, length=5, frame_size=8, hop_length=4, center=True, downsampling=5
        ),
    ),
}


def direct(path: str, key: str, getter: h5m.Getter) -> list[np.ndarray]:
    """Every item of ``getter``, id by id, read with plain h5py and numpy."""
    with h5py.File(path, "r") as f:
        values, refs = f[key]["values"][()], f[key]["refs"][()]
    return [item for a, b in refs[refs[:, 0] >= 0] for item in items_of(values[a:b], getter)]


def items_of(array: np.ndarray, getter: h5m.Getter) -> list[np.ndarray]:
    """The items of ``getter`` in one id's array, with numpy."""
    if type(getter) is h5m.Getter:
        return list(array)
    if type(getter) is h5m.GetId:
        return [array]
    if type(getter) is h5m.AsSlice:
        starts = range(getter.shift, len(array) - getter.length + 1, getter.downsampling)
        return [array[s : s + getter.length] for s in starts]
    fs, hop = getter.frame_size, getter.hop_length
    padded = np.pad(array, fs // 2, mode="reflect")
    span = (getter.length - 1) * hop
    starts = range(getter.shift * hop, len(array) - span, getter.downsampling)
    return [np.stack([padded[c : c + fs] for c in range(s, s + span + 1, hop)]) for s in starts]


def check_epoch(batches: list, expected: list[np.ndarray], shuffled: bool) -> None:
    """Every item exactly once, equal to what h5py reads; in order unless shuffled."""
    lookup = {e.tobytes(): i for i, e in enumerate(expected)}
    seen = [lookup[np.ascontiguousarray(s).tobytes()] for b in batches for s in b.numpy()]
    assert sorted(seen) == list(range(len(expected)))
    assert (seen == sorted(seen)) != shuffled


def test_import_never_imports_torch():
    code = "import h5dask, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_serve_without_torch_says_how_to_install(path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import h5dask as h5m\n"
        f"f = h5m.TypedFile({path!r})\n"
        "try:\n    f.serve(h5m.Input('x'))\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "pip install h5dask[torch]" in out.stdout, out.stderr


@pytest.mark.parametrize("name", list(GETTERS))
@pytest.mark.parametrize("shuffle", [False, True])
def test_getters_in_fork_workers(path, name, shuffle):
    key, getter = GETTERS[name]
    expected = direct(path, key, getter)
    loader = Data(path).serve(
        h5m.Input(key=key, getter=getter),
        batch_size=8,
        shuffle=shuffle,
        num_workers=2,
        multiprocessing_context="fork",
    )
    assert len(loader.dataset) == len(expected)
    check_epoch(list(loader), expected, shuffle)


class Paired(h5m.TypedFile):
    x = h5m.Array()
    y = h5m.Array()
    w = h5m.Array()


N_PAIRED = 30


def has_x(k: int) -> bool:
    return k % 5 != 3


def has_w(k: int) -> bool:
    return k % 4 != 1


def w_of(k: int) -> np.ndarray:
    return k * 1000 + np.arange(20 + k % 7, dtype="f8")


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> str:
    """Features covering different ids, each value encoding its id: x (4, 3) rows of
    k * 100 + ..., y the label k, w a signal of k * 1000 + step, 20 to 26 steps."""
    path = str(tmp_path_factory.mktemp("paired") / "paired.h5")
    with Paired(path, mode="w") as f:
        for k in range(N_PAIRED):
            data = {"y": np.array([k])}
            if has_x(k):
                data["x"] = x_of(k)
            if has_w(k):
                data["w"] = w_of(k)
            f.add(str(k), data)
    return path


def loader_of(file, batch, workers, context="fork", **kwargs):
    return file.serve(
        batch,
        batch_size=7,
        num_workers=workers,
        multiprocessing_context=context if workers else None,
        **kwargs,
    )


def test_features_covering_different_ids_are_an_error_naming_them(paired):
    f = Paired(paired)
    batch = {"x": h5m.Input("x", h5m.GetId()), "y": h5m.Target("y", h5m.GetId())}
    with pytest.raises(ValueError, match=r"Input\('x', GetId\) of .*paired.h5' has no data "
                       r"for 6 of the 30 ids .*\(e.g. '3', '8', '13'\).*ids='shared'"):  # fmt: skip
        f.serve(batch)
    with pytest.raises(ValueError, match=r"Target\('y', GetId\).* no data for 1 of the 2 ids "
                       r"asked for \(e.g. 'nope'\)"):  # fmt: skip
        f.serve({"y": h5m.Target("y", h5m.GetId())}, ids=["0", "nope"])
    with pytest.raises(ValueError, match="takes a sequence of ids or 'shared'"):
        f.serve(batch, ids="0")


@pytest.mark.parametrize("workers", [0, 2])
def test_get_id_items_pair_by_id(paired, workers):
    """x and y of every sample come from one id: x encodes it, y is its label."""
    f = Paired(paired)
    batch = {"x": h5m.Input("x", h5m.GetId()), "y": h5m.Target("y", h5m.GetId())}
    shared = [str(k) for k in range(N_PAIRED) if has_x(k)]
    chosen = ["29", "0", "17", "4"]  # in this order, not the file's
    for ids, want in [("shared", shared), (chosen, chosen)]:
        loader = loader_of(f, batch, workers, ids=ids, shuffle=ids == "shared")
        assert loader.dataset.ids.tolist() == want
        batches = list(loader)
        xs = np.concatenate([b["x"].numpy() for b in batches])
        ys = np.concatenate([b["y"].numpy() for b in batches]).ravel()
        assert np.array_equal(xs[:, 0, 0] // 100, ys)  # paired in every sample
        assert sorted(ys.tolist()) == sorted(int(k) for k in want)
        if ids is chosen:
            assert ys.tolist() == [29, 0, 17, 4]
            assert np.array_equal(xs, np.stack([x_of(k) for k in ys]))


@pytest.mark.parametrize("workers", [0, 2])
def test_windows_stay_in_their_id_and_pair_by_id(paired, workers):
    """Every getter in one nested batch, shuffled: the windows of w, the rows of x, the
    whole x and the label y of each sample all come from one id, window k of row k."""
    slices = h5m.AsSlice(length=5, downsampling=3)
    frames = h5m.AsFramedSlice(length=3, frame_size=4, hop_length=2, center=True, downsampling=4)
    batch = {
        "x": h5m.Input(key="x", getter=h5m.GetId(), to_tensor=True),
        "pair": (h5m.Target(key="y", getter=h5m.GetId()), h5m.Input(key="x")),
        "sig": [h5m.Input("w", slices), h5m.Target("w", frames)],
        "tag": "constant",
    }
    f = Paired(paired)
    # spawn: the workers inherit nothing of this process
    loader = loader_of(f, batch, workers, "spawn", ids="shared", shuffle=True)
    batches = list(loader)
    assert batches[0]["tag"] == ["constant"] * 7
    got = {}
    for b in batches:
        for j, label in enumerate(b["pair"][0].numpy().ravel().tolist()):
            row = b["pair"][1][j].numpy()
            k = int(row[0] - label * 100) // 3  # the row of x: the item within the id
            values = (b["x"][j].numpy(), row, b["sig"][0][j].numpy(), b["sig"][1][j].numpy())
            assert (label, k) not in got
            got[label, k] = values
    want = {}
    for label in range(N_PAIRED):
        if not (has_x(label) and has_w(label)):
            continue
        x, w = x_of(label), w_of(label)
        columns = [items_of(x, h5m.Getter()), items_of(w, slices), items_of(w, frames)]
        for k in range(min(map(len, columns))):  # each id: as many items as its fewest
            want[label, k] = (x, *(column[k] for column in columns))
    assert sorted(got) == sorted(want) and len(loader.dataset) == len(want)
    for key, values in want.items():
        for a, b in zip(got[key], values, strict=True):
            assert np.array_equal(a, b)
            assert (b // 1000 == key[0]).all() or (b // 100 == key[0]).all()  # from its id


def test_plain_datasets_pair_by_position_alone(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as h:
        h["a"], h["b"] = np.arange(10), np.arange(10) * 2
        h.create_group("feat")
    with Paired(path, mode="r+") as f:
        f.add("0", {"y": np.array([5])})
    f = Paired(path)
    ds = ProgrammableDataset(f, (h5m.Input("a"), h5m.Target("b")))
    assert ds.ids is None and [tuple(ds[i]) for i in (0, 9)] == [(0, 0), (9, 18)]
    with pytest.raises(ValueError, match=r"Input\('a', Getter\): a plain dataset has no ids"):
        ProgrammableDataset(f, (h5m.Input("a"), h5m.Target("y", h5m.GetId())))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_keep_open_parent_handle_does_not_leak(path, context):
    f = Data(path, keep_open=True)
    assert f.x[0].shape == (3,) and f._handle.is_open  # a handle open before the loader
    loader = f.serve(
        {"x": h5m.Input("x", h5m.GetId())},
        batch_size=16,
        num_workers=2,
        multiprocessing_context=context,
    )
    got = np.concatenate([b["x"].numpy() for b in loader])
    assert np.array_equal(got, np.stack(direct(path, "x", h5m.GetId())))
    assert f._handle.is_open and np.array_equal(
        f.x[4:6], np.stack(direct(path, "x", h5m.Getter()))[4:6]
    )


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_typed_file_dataset_in_workers(path, context):
    ds = DS(path, keep_open=True)
    first = ds[0][2].copy()
    loader = DataLoader(
        ds, batch_size=10, shuffle=True, num_workers=2, multiprocessing_context=context
    )
    pids, labels, rows = zip(*[(p, y, x) for p, y, x in loader], strict=True)
    assert os.getpid() not in set(torch.cat(pids).tolist())
    labels = torch.cat(labels).numpy().ravel()
    assert sorted(labels.tolist()) == list(range(40))
    want = np.stack(direct(path, "x", h5m.Getter()))[labels]
    assert np.array_equal(torch.cat(rows).numpy(), want)
    assert np.array_equal(ds[0][2], first)  # the parent's kept handle still reads right


def test_items_are_copies(path):
    f = Data(path)
    ds = ProgrammableDataset(f, [h5m.Input("sig", h5m.AsSlice(length=10, downsampling=5))])
    a, b = (s[0] for s in ds.__getitems__([0, 1]))  # overlapping windows, one read
    a[:] = -1
    assert np.array_equal(b, np.arange(5.0, 15.0))
    ds[0][0][:] = -1
    assert np.array_equal(ds[0][0], np.arange(10.0))


def test_batched_and_single_reads_agree(path):
    f = Data(path)
    for key, getter in GETTERS.values():
        ds = ProgrammableDataset(f, h5m.Input(key, getter))
        picks = [5, 0, 3, 3, -1, 2]
        for one, many in zip([ds[i] for i in picks], ds.__getitems__(picks), strict=True):
            assert np.array_equal(one, many)


def test_bad_items_name_the_cause(path):
    f = Data(path)
    with pytest.raises(KeyError, match="nope"):
        ProgrammableDataset(f, h5m.Input("nope"))
    with pytest.raises(ValueError, match="length must be >= 1"):
        h5m.AsSlice(length=0)
    with pytest.raises(ValueError, match="no Input or Target"):
        ProgrammableDataset(f, {"a": 1})
    with pytest.raises(TypeError, match="key="):
        h5m.Input(3)
    with pytest.raises(IndexError, match="out of range"):
        ProgrammableDataset(f, h5m.Input("x", h5m.GetId()))[len(f.x.ids)]
