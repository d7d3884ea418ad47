"""TypedFile.add and get(id) against plain h5py loops doing the same work (issue 2, "Speed").

- append: 20,000 arrays of (16, 16) float32 added one ``file.add(id, {"x": arr})``
  at a time, then ``close()``; the plain loop buffers the arrays and appends
  them in ~16 MiB blocks to one dataset, with their offsets rows and ids
  (target: h5dask within 2x of its time).
- get: 1,000 random ids read with ``file.x.get(id)``; plain h5py slices the
  dataset with an in-memory offsets table and an id -> position dict (target:
  median latency within 1.5x). ``keep_open=True`` is compared with one open
  h5py file; ``keep_open=False`` with opening the file for every read.

Figures are medians of 9 append runs, each writing a fresh file, and of 3 get
runs (``--small``: 2,000 sources, 200 reads, 1 run); the methods take turns.

Run: ``.venv/bin/python benchmarks/bench_typed_file.py [--small]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import h5py
import numpy as np

import h5dask as h5m

FLUSH_BYTES = 16 << 20
CHUNK_BYTES = 1 << 20
APPEND_TARGET = 2.0
GET_TARGET = 1.5


class Logs(h5m.TypedFile):
    x = h5m.Array()


# -- append ---------------------------------------------------------------------------------------


def plain_append(path: str, ids: list[str], arrays: list[np.ndarray]) -> None:
    """Buffer, then append values, offsets rows and ids in ~16 MiB blocks."""
    with h5py.File(path, "w") as f:
        trailing, dtype = arrays[0].shape[1:], arrays[0].dtype
        rows = max(1, CHUNK_BYTES // (int(np.prod(trailing)) * dtype.itemsize))
        values = f.create_dataset(
            "values", (0, *trailing), dtype, maxshape=(None, *trailing), chunks=(rows, *trailing)
        )
        offsets = f.create_dataset("offsets", (0, 2), np.int64, maxshape=(None, 2), chunks=True)
        names = f.create_dataset(
            "ids", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(16384,)
        )
        start, buffered = 0, 0
        for k, array in enumerate(arrays):
            buffered += array.nbytes
            if buffered >= FLUSH_BYTES or k == len(arrays) - 1:
                flush_block(values, offsets, names, ids[start : k + 1], arrays[start : k + 1])
                start, buffered = k + 1, 0


def flush_block(values, offsets, names, ids: list[str], arrays: list[np.ndarray]) -> None:
    lengths = np.array([len(a) for a in arrays])
    stop0 = values.shape[0]
    block = np.concatenate(arrays)
    append(values, block)
    stops = stop0 + np.cumsum(lengths)
    append(offsets, np.stack([stops - lengths, stops], axis=1))
    append(names, np.array(ids, dtype=object))


def append(ds: h5py.Dataset, rows: np.ndarray) -> None:
    start = ds.shape[0]
    ds.resize(start + len(rows), axis=0)
    ds[start:] = rows


def typed_append(path: str, ids: list[str], arrays: list[np.ndarray], keep_open: bool) -> None:
    file = Logs(path, mode="w", keep_open=keep_open)
    for id, array in zip(ids, arrays, strict=True):
        file.add(id, {"x": array})
    file.close()


def bench_append(tmp: str, ids: list[str], arrays: list[np.ndarray], repeats: int) -> None:
    methods: dict[str, Callable[[str], None]] = {
        "h5py": lambda p: plain_append(p, ids, arrays),
        "add keep_open=False": lambda p: typed_append(p, ids, arrays, False),
        "add keep_open=True": lambda p: typed_append(p, ids, arrays, True),
    }
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(repeats):
        for method, fn in methods.items():
            path = os.path.join(tmp, f"append-{r}-{len(seconds[method])}-{method[-5:]}.h5")
            start = time.perf_counter()
            fn(path)
            seconds[method].append(time.perf_counter() - start)
            os.remove(path)
    n = len(ids)
    print(f"\nappend: {n} sources of {arrays[0].shape} {arrays[0].dtype}, one add() each")
    print(f"{'method':<22}{'seconds':>9}{'src/s':>10}{'us/src':>9}{'vs h5py':>9}  target")
    ref = statistics.median(seconds["h5py"])
    for method, times in seconds.items():
        t = statistics.median(times)
        slower = t / ref
        mark = "reference" if method == "h5py" else verdict(slower, APPEND_TARGET)
        print(f"{method:<22}{t:>9.3f}{n / t:>10.0f}{1e6 * t / n:>9.1f}{slower:>8.2f}x  {mark}")


def verdict(slower: float, target: float) -> str:
    return f"<= {target}x " + ("ok" if slower <= target else "MISS")


# -- get ------------------------------------------------------------------------------------------


def latencies(fn: Callable[[str], object], ids: list[str]) -> float:
    """Median seconds of ``fn(id)`` over ``ids``."""
    times = []
    for id in ids:
        start = time.perf_counter()
        fn(id)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_get_open(path: str, reads: list[str]) -> float:
    with h5py.File(path, "r") as f:
        position = {id: k for k, id in enumerate(f["__src__/id"].asstr()[:])}
        offsets = f["x/refs"][:]
        values = f["x/values"]

        def get(id: str) -> np.ndarray:
            start, stop = offsets[position[id]]
            return values[start:stop]

        return latencies(get, reads)


def plain_get_reopen(path: str, reads: list[str]) -> float:
    with h5py.File(path, "r") as f:
        position = {id: k for k, id in enumerate(f["__src__/id"].asstr()[:])}
        offsets = f["x/refs"][:]

    def get(id: str) -> np.ndarray:
        start, stop = offsets[position[id]]
        with h5py.File(path, "r") as f:
            return f["x/values"][start:stop]

    return latencies(get, reads)


def typed_get(path: str, reads: list[str], keep_open: bool) -> float:
    file = Logs(path, mode="r", keep_open=keep_open)
    result = latencies(file.x.get, reads)
    file.close()
    return result


def check_get(path: str, ids: list[str], arrays: list[np.ndarray]) -> None:
    with Logs(path, mode="r") as file:
        for k in (0, len(ids) // 2, len(ids) - 1):
            assert np.array_equal(file.x.get(ids[k]), arrays[k]), f"get({ids[k]!r}) is wrong"


def bench_get(tmp: str, ids: list[str], arrays: list[np.ndarray], n_reads: int, repeats: int):
    path = os.path.join(tmp, "get.h5")
    typed_append(path, ids, arrays, keep_open=True)
    check_get(path, ids, arrays)
    rng = np.random.default_rng(0)
    pairs = {
        "keep_open=True": (plain_get_open, lambda p, r: typed_get(p, r, True)),
        "keep_open=False": (plain_get_reopen, lambda p, r: typed_get(p, r, False)),
    }
    print(f"\nget(id): {n_reads} random ids of {len(ids)}, median latency of one read")
    print(f"{'case':<18}{'h5py us':>9}{'h5dask us':>11}{'ratio':>8}  target")
    for case, (plain, typed) in pairs.items():
        plain_us, typed_us = [], []
        for _ in range(repeats):
            reads = [ids[k] for k in rng.integers(0, len(ids), n_reads)]
            plain_us.append(1e6 * plain(path, reads))
            typed_us.append(1e6 * typed(path, reads))
        p, t = statistics.median(plain_us), statistics.median(typed_us)
        print(f"{case:<18}{p:>9.1f}{t:>11.1f}{t / p:>7.2f}x  {verdict(t / p, GET_TARGET)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer sources and reads, one run")
    args = parser.parse_args()
    n, n_reads, repeats = (2_000, 200, 1) if args.small else (20_000, 1_000, 3)
    rng = np.random.default_rng(0)
    arrays = [rng.random((16, 16), dtype=np.float32) for _ in range(n)]
    ids = [f"source-{k:06d}" for k in range(n)]
    tmp = tempfile.mkdtemp(prefix="h5dask-bench-typed-")
    try:
        bench_append(tmp, ids, arrays, 3 * repeats)
        bench_get(tmp, ids, arrays, n_reads, repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
