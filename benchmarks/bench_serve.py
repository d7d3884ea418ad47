"""serve() against a hand-written torch Dataset over plain h5py doing the same reads (issue 5).

- GetId: 10,000 ids, each a (16, 64) float32 array (4 KiB); item i is the i-th
  id's array. The hand-written Dataset keeps one h5py file open per process,
  the ref table in numpy, and reads ``values[start:stop]``.
- AsSlice: windows of 2,048 steps every 512 steps over a 1-D float32 signal of
  2**23 steps; the hand-written Dataset reads ``values[i * 512 : i * 512 + 2048]``.

Both run in the same DataLoader (batch_size=32, shuffle with the same seed) with
0 and 2 worker processes (fork), for ``--batches`` batches after the first (so
worker start-up is not counted). Figures are batches/s, medians of 3 runs
(``--small``: fewer batches, 1 run). Target: serve at least 0.9x.

Each reader is measured in a fresh process: HDF5 shares one open file, and one
chunk cache per dataset, between all the handles a process opens on it, so a
reader measured after another would read through the other's settings.

Run: ``.venv/bin/python benchmarks/bench_serve.py [--small]``
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import h5dask as h5m

N_IDS, ITEM = 10_000, (16, 64)
SIGNAL, LENGTH, HOP = 1 << 23, 2048, 512
BATCH = 32
TARGET = 0.9


class Items(h5m.TypedFile):
    x = h5m.Array()


class Signal(h5m.TypedFile):
    sig = h5m.Array()


class PlainGetId(Dataset):
    """The hand-written reference: one h5py file per process, refs in numpy."""

    def __init__(self, path: str):
        self.path = path
        with h5py.File(path, "r") as f:
            table = f["x/refs"][()]
        self.refs = table[table[:, 0] >= 0]
        self.ds = None

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.ds is None:
            self.ds = h5py.File(self.path, "r")["x/values"]
        start, stop = self.refs[i]
        return self.ds[start:stop]


class PlainSlice(Dataset):
    """The hand-written reference of AsSlice windows."""

    def __init__(self, path: str):
        self.path = path
        self.n = (SIGNAL - LENGTH) // HOP + 1
        self.ds = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        if self.ds is None:
            self.ds = h5py.File(self.path, "r")["sig/values"]
        return self.ds[i * HOP : i * HOP + LENGTH]


def build(folder: str) -> tuple[str, str]:
    items, signal = os.path.join(folder, "items.h5"), os.path.join(folder, "signal.h5")
    rng = np.random.default_rng(0)
    with Items(items, mode="w") as f:
        for i in range(N_IDS):
            f.add(f"item-{i}", {"x": rng.standard_normal(ITEM, dtype="f4")})
    with Signal(signal, mode="w") as f:
        f.add("signal", {"sig": rng.standard_normal(SIGNAL, dtype="f4")})
    return items, signal


def batches_per_s(dataset: Dataset, workers: int, n_batches: int) -> float:
    """Batches/s over ``n_batches`` after the first, shuffled with a fixed seed."""
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(0),
    )
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    count = sum(1 for _ in itertools.islice(it, n_batches))
    elapsed = time.perf_counter() - start
    del it
    return count / elapsed


def dataset(case: str, method: str, path: str) -> Dataset:
    """The Dataset of one case read by one method (``"h5py"`` or ``"serve"``)."""
    if case == "GetId":
        if method == "h5py":
            return PlainGetId(path)
        return h5m.serve.ProgrammableDataset(Items(path), h5m.Input("x", h5m.GetId()))
    if method == "h5py":
        return PlainSlice(path)
    return h5m.serve.ProgrammableDataset(
        Signal(path), h5m.Input("sig", h5m.AsSlice(length=LENGTH, downsampling=HOP))
    )


def measure(case: str, method: str, path: str, workers: int, n_batches: int) -> float:
    """Batches/s of one run, in a process of its own (see the module docstring)."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        job = pool.submit(run_case, case, method, path, workers, n_batches)
        return job.result()


def run_case(case: str, method: str, path: str, workers: int, n_batches: int) -> float:
    return batches_per_s(dataset(case, method, path), workers, n_batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer batches, one run")
    parser.add_argument("--batches", type=int, default=300)
    args = parser.parse_args()
    runs, n_batches = (1, 60) if args.small else (3, args.batches)
    with tempfile.TemporaryDirectory() as folder:
        paths = dict(zip(("GetId", "AsSlice"), build(folder), strict=True))
        print(f"{'case':<10}{'workers':>8}{'h5py b/s':>12}{'serve b/s':>12}{'ratio':>8}")
        for (case, path), workers in itertools.product(paths.items(), (0, 2)):
            figures: dict[str, list[float]] = {"h5py": [], "serve": []}
            for _, method in itertools.product(range(runs), figures):
                figures[method].append(measure(case, method, path, workers, n_batches))
            ref, ours = (statistics.median(figures[m]) for m in ("h5py", "serve"))
            flag = "" if ours / ref >= TARGET else f"  < {TARGET}x"
            print(f"{case:<10}{workers:>8}{ref:>12.1f}{ours:>12.1f}{ours / ref:>8.2f}{flag}")


if __name__ == "__main__":
    main()
