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
    """Every item of ``getter``, read with plain h5py and numpy."""
    with h5py.File(path, "r") as f:
        values, refs = f[key]["values"][()], f[key]["refs"][()]
    if type(getter) is h5m.Getter:
        return list(values)
    if type(getter) is h5m.GetId:
        return [values[a:b] for a, b in refs[refs[:, 0] >= 0]]
    if type(getter) is h5m.AsSlice:
        starts = range(getter.shift, len(values) - getter.length + 1, getter.downsampling)
        return [values[s : s + getter.length] for s in starts]
    fs, hop = getter.frame_size, getter.hop_length
    padded = np.pad(values, fs // 2, mode="reflect")
    span = (getter.length - 1) * hop
    starts = range(getter.shift * hop, len(values) - span, getter.downsampling)
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


def test_nested_batch_in_spawn_workers(path):
    """Every getter in one nested batch, shuffled, in spawn workers; items stay paired."""
    batch = {
        "x": h5m.Input(key="x", getter=h5m.GetId(), to_tensor=True),
        "pair": (h5m.Target(key="y", getter=h5m.GetId()), h5m.Input(key="x")),
        "sig": [
            h5m.Input(key=k, getter=g) for k, g in (GETTERS["AsSlice"], GETTERS["AsFramedSlice"])
        ],
        "tag": "constant",
    }
    f = Data(path)
    loader = f.serve(
        batch, batch_size=8, shuffle=True, num_workers=2, multiprocessing_context="spawn"
    )
    n_x = len(f.x.ids)
    assert len(loader.dataset) == n_x  # the smallest of the items' lengths
    batches = list(loader)
    assert batches[0]["tag"] == ["constant"] * 8
    ids_x = np.concatenate([b["x"][:, 0, 0].numpy() // 100 for b in batches]).astype(int)
    expected_y = np.arange(N_IDS)  # every id has y: y's i-th id is id i
    x_ids = np.array([int(k) for k in f.x.ids])
    positions = np.searchsorted(x_ids, ids_x)
    labels = np.concatenate([b["pair"][0].numpy().ravel() for b in batches])
    assert sorted(positions.tolist()) == list(range(n_x))
    assert np.array_equal(labels, expected_y[positions])  # x and y read the same item index
    rows = np.concatenate([b["pair"][1].numpy() for b in batches])
    assert np.array_equal(rows, np.stack(direct(path, "x", h5m.Getter()))[positions])
    for j, name in enumerate(["AsSlice", "AsFramedSlice"]):
        got = np.concatenate([b["sig"][j].numpy() for b in batches])
        want = np.stack(direct(path, *GETTERS[name]))[positions]
        assert np.array_equal(got, want)


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
