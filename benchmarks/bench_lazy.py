"""Full scan (sum) of a feature through ``to_dask()`` against plain h5py, and graph build time.

Plain h5py reads chunk-sized blocks in a loop and sums them; h5dask builds
``proxy.to_dask()`` and computes ``.sum()`` on one process (``scheduler="sync"``),
on the threads scheduler, and on a LocalCluster of 2 worker processes. Every
figure is the median of 3 runs; the OS page cache is warm for all of them.

Run ``python benchmarks/bench_lazy.py`` (1 GiB features) or ``--small`` (64 MiB).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import dask
import h5py
import numpy as np
from distributed import Client, LocalCluster

import h5dask as h5m
from h5dask import format as fmt

RUNS = 3
N_COLS = 256  # float32 rows of 1 KiB


def make_file(path: str, nbytes: int, compression: str | None) -> h5m.TypedFile:
    """A feature of ``nbytes`` float32, 1,000 ids, written through the h5dask writer."""
    rows = nbytes // (N_COLS * 4)
    kwargs = {"compression": compression, "compression_opts": 1} if compression else {}
    file = h5m.TypedFile(path, mode="w", schema={"x": h5m.Array(**kwargs)})
    rng = np.random.default_rng(0)
    block = rng.integers(0, 100, size=(rows // 1000, N_COLS)).astype(np.float32)
    for i in range(1000):
        file.add(f"id-{i:05d}", {"x": block})
    file.close()
    return file


def h5py_scan(path: str) -> float:
    with h5py.File(path, "r") as f:
        ds = f["x/values"]
        step = ds.chunks[0]
        total = 0.0
        for start in range(0, ds.shape[0], step):
            total += float(ds[start : start + step].sum(dtype=np.float64))
    return total


def median_time(fn: Callable[[], float]) -> tuple[float, float]:
    times, value = [], 0.0
    for _ in range(RUNS):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def scan_figures(file: h5m.TypedFile, client: Client) -> None:
    nbytes = file.x.size * 4
    mb = nbytes / 1e6
    base, expected = median_time(lambda: h5py_scan(file.filename))
    print(f"  plain h5py, chunk-sized blocks:  {mb / base:8.0f} MB/s")
    lazy = file.x.to_dask().sum(dtype=np.float64)
    runs = {
        "to_dask(), sync (1 process, 1 thread)": lambda: float(lazy.compute(scheduler="sync")),
        "to_dask(), threads (1 process, dask's default)": lambda: float(
            lazy.compute(scheduler="threads")
        ),
        "to_dask(), LocalCluster 2 procs": lambda: float(client.compute(lazy).result()),
    }
    with dask.config.set({"array.chunk-size": "8MiB"}):
        small = file.x.to_dask().sum(dtype=np.float64)
    runs["to_dask(), sync, 8 MiB blocks"] = lambda: float(small.compute(scheduler="sync"))
    targets = {"threads": (0.8, "one process"), "LocalCluster": (1.0, "2 processes")}
    for name, fn in runs.items():
        seconds, value = median_time(fn)
        assert value == expected, (name, value, expected)
        ratio = base / seconds
        target = next((t for key, t in targets.items() if key in name), None)
        verdict = "" if target is None else f"  target > {target[0]}x ({target[1]}): "
        verdict += "" if target is None else ("ok" if ratio >= target[0] else "MISS")
        print(f"  {name:48s} {mb / seconds:8.0f} MB/s   ratio {ratio:5.2f}x{verdict}")


def graph_figures(directory: str) -> None:
    n_ids, rows = 1_000_000, 4_000_000
    path = os.path.join(directory, "ids.h5")
    edges = np.linspace(0, rows, n_ids + 1).astype(np.int64)
    with h5py.File(path, "w") as f:
        fmt.init_root(f)
        f[fmt.IDS].resize((n_ids,))
        f[fmt.IDS][:] = np.char.add("s", np.arange(n_ids).astype(str)).astype(object)
        group = f.create_group("x")
        group.create_dataset("values", shape=(rows, 64), dtype=np.float32, chunks=(4096, 64))
        group.create_dataset("refs", data=np.stack([edges[:-1], edges[1:]], axis=1))
    file = h5m.TypedFile(path)
    seconds, _ = median_time(lambda: len(file.x.to_dask().__dask_graph__()))
    tasks = len(file.x.to_dask().__dask_graph__())
    print(f"  to_dask() on 1,000,000 ids:  {seconds * 1e3:6.1f} ms, {tasks} tasks")
    assert len(file.x.refs) == n_ids  # the ref table is read once and cached, as by any reader
    seconds, _ = median_time(lambda: file.x.to_bag().npartitions)
    print(f"  to_bag() on 1,000,000 ids:   {seconds * 1e3:6.1f} ms, "
          f"{file.x.to_bag().npartitions} partitions")  # fmt: skip
    seconds, _ = median_time(lambda: file.x.to_dask("s123456").shape[0])
    print(f"  to_dask(id) of one id:       {seconds * 1e3:6.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="64 MiB features: a quick run")
    args = parser.parse_args()
    nbytes = (64 if args.small else 1024) << 20
    print(f"dask array.chunk-size {dask.config.get('array.chunk-size')}, medians of {RUNS} runs")
    with (
        tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as directory,
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,  # fmt: skip
        Client(cluster, set_as_default=False) as client,
    ):
        for compression in (None, "gzip"):
            path = os.path.join(directory, f"{compression}.h5")
            file = make_file(path, nbytes, compression)
            on_disk = os.path.getsize(path) / 1e6
            label = "gzip level 1" if compression else "uncompressed"
            print(f"full scan (sum) of {file.x.size * 4 / 1e6:.0f} MB, {label}, "
                  f"{on_disk:.0f} MB on disk, HDF5 chunks {file.x.chunks}:")  # fmt: skip
            scan_figures(file, client)
            os.remove(path)
        print("graph build:")
        graph_figures(directory)


if __name__ == "__main__":
    main()
