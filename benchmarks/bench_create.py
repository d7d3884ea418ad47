"""TypedFile.create against a plain h5py serial loop (issue 3, "Speed and memory").

For each workload the script prints sources/s, MB/s (1 MB = 1e6 bytes of array
data) and the writer's peak memory, for:

- ``h5py``: a plain serial loop in this process: load each source, buffer the
  arrays, append them in ~16 MiB blocks to one dataset (chunks of ~1 MiB) and
  keep an ``(n, 2)`` offsets table, written at the end;
- ``default``: ``create`` on its embedded LocalCluster of 2 worker processes,
  cluster start-up included;
- ``client``: ``create(..., scheduler=client)`` on an already-started Client of
  a LocalCluster of 2 worker processes (start-up excluded);
- ``threads``: ``create(..., scheduler="threads", n_workers=2)``.

Every run is a fresh process, started after an ``os.sync()`` (modules imported
and a 20-source warm-up build done before the clock starts; for ``client`` the
cluster too); each output is checked against the plain loop's and deleted
before the next run, and the h5dask methods take turns at running first
(:func:`bench_workload` says why). Peak memory is
the growth of that (the writer's) process's resident set size over its size
before the run, sampled every 2 ms by a psutil thread; worker processes are
not counted, and with ``threads`` the loads run in the writer's process too.
Each figure is the median of 3 runs (``--repeats N``: N runs; ``--small``: 1 run, fewer sources);
ratios are the plain loop's time over h5dask's. A last table builds N and 10N
small sources (20,000 and 200,000: past the writer's 16 MiB flush, so that the
buffer is full in both) and prints the ratio of their median peak memory
growths (target <= 1.2).

Run: ``.venv/bin/python benchmarks/bench_create.py [--small]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import h5py
import numpy as np
import psutil

import h5dask as h5m

FLUSH_BYTES = 16 << 20
CHUNK_BYTES = 1 << 20
N_WORKERS = 2
METHODS = ("h5py", "default", "client", "threads")
#: the issue's targets, as ratios to the plain loop: (default engine, threads)
TARGETS = {
    "small": (0.8, 0.8),
    "medium": (0.4, 0.8),
    "png": (1.4, None),
    "ragged": (0.5, 0.8),
}


# -- loads, the same for the plain loop and the features ----------------------------------------


def spin(n: int) -> int:
    """Pure-Python work holding the GIL: ``n`` loop iterations."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def calibrate_spin(seconds: float = 0.003) -> int:
    """Iterations of :func:`spin` taking about ``seconds`` on this machine."""
    n = 10_000
    start = time.perf_counter()
    spin(n)
    per = (time.perf_counter() - start) / n
    return max(1, int(seconds / per))


def load_npy(source: str) -> np.ndarray:
    return np.load(source)


def load_png(source: str, n_spin: int) -> np.ndarray:
    from PIL import Image

    with Image.open(source) as image:
        array = np.asarray(image.convert("RGB"))[None]
    spin(n_spin)
    return array


class NpyFeature(h5m.Feature):
    """``np.load`` of a ``.npy`` file, as the plain loop does."""

    __re__ = r"\.npy$"

    def load(self, source: str) -> np.ndarray:
        return load_npy(source)


class PngFeature(h5m.Feature):
    """A PNG decoded with Pillow, then ``n_spin`` iterations of pure-Python work."""

    __re__ = r"\.png$"

    def __init__(self, n_spin: int):
        self.n_spin = n_spin

    def load(self, source: str) -> np.ndarray:
        return load_png(source, self.n_spin)


# -- workloads -----------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    paths: list[str]
    nbytes: int
    load: Callable[[str], np.ndarray]
    feature: h5m.Feature


def make_npy(root: str, name: str, shapes: Iterator[tuple[int, ...]], n: int) -> Workload:
    folder = os.path.join(root, name)
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    paths, nbytes = [], 0
    for k, shape in zip(range(n), shapes, strict=False):
        array = rng.random(shape, dtype=np.float32)
        paths.append(os.path.join(folder, f"{k:06d}.npy"))
        np.save(paths[-1], array)
        nbytes += array.nbytes
    return Workload(name, paths, nbytes, load_npy, NpyFeature())


def make_png(root: str, n: int, n_spin: int) -> Workload:
    from PIL import Image

    folder = os.path.join(root, "png")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    paths = []
    for k in range(n):
        pixels = rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)
        paths.append(os.path.join(folder, f"{k:06d}.png"))
        Image.fromarray(pixels).save(paths[-1])
    load = PngFeature(n_spin).load
    return Workload("png", paths, n * 128 * 128 * 3, load, PngFeature(n_spin))


def make_workloads(root: str, small: bool, n_spin: int) -> list[Workload]:
    scale = 10 if small else 1
    ragged_rng = np.random.default_rng(1)
    return [
        make_npy(root, "small", iter(lambda: (16, 16), None), 20_000 // scale),
        make_npy(root, "medium", iter(lambda: (256, 256), None), 2_000 // scale),
        make_png(root, 2_000 // scale, n_spin),
        make_npy(
            root,
            "ragged",
            iter(lambda: (int(ragged_rng.integers(1, 501)), 32), None),
            5_000 // scale,
        ),
    ]


# -- measuring -----------------------------------------------------------------------------------


class PeakRSS:
    """Peak growth of this process's RSS during a ``with`` block, sampled by a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.process = psutil.Process()
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.process.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


@dataclass
class Run:
    seconds: float
    peak_mib: float


def timed(fn: Callable[[], object]) -> Run:
    with PeakRSS() as rss:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    return Run(seconds, rss.growth_mib)


# -- the two writers -----------------------------------------------------------------------------


def plain_h5py(paths: list[str], out: str, load: Callable[[str], np.ndarray]) -> None:
    """Serial loop: load, buffer, append ~16 MiB blocks, offsets table at the end."""
    offsets = np.empty((len(paths), 2), dtype=np.int64)
    buffer: list[np.ndarray] = []
    buffered = stop = 0
    with h5py.File(out, "w") as f:
        for k, path in enumerate(paths):
            array = load(path)
            offsets[k] = stop, stop + len(array)
            stop += len(array)
            buffer.append(array)
            buffered += array.nbytes
            if buffered >= FLUSH_BYTES:
                append_block(f, buffer)
                buffer, buffered = [], 0
        append_block(f, buffer)
        f.create_dataset("offsets", data=offsets)


def append_block(f: h5py.File, buffer: list[np.ndarray]) -> None:
    if not buffer:
        return
    block = np.concatenate(buffer)
    if "values" not in f:
        trailing = block.shape[1:]
        rows = max(1, CHUNK_BYTES // (math.prod(trailing) * block.dtype.itemsize))
        f.create_dataset(
            "values",
            (0, *trailing),
            block.dtype,
            maxshape=(None, *trailing),
            chunks=(rows, *trailing),
        )
    ds = f["values"]
    start = ds.shape[0]
    ds.resize(start + len(block), axis=0)
    ds[start:] = block


def h5dask_create(work: Workload, out: str, scheduler: object) -> None:
    file = h5m.TypedFile.create(
        out,
        work.paths,
        schema={"x": work.feature},
        n_workers=N_WORKERS,
        scheduler=scheduler,
        progress=False,
    )
    file.close()


def check_same(work: Workload, plain: str, typed: str) -> None:
    """The h5dask file holds the same values and offsets as the plain one."""
    with h5py.File(plain, "r") as a, h5py.File(typed, "r") as b:
        assert b["__src__/id"].shape[0] == len(work.paths), f"{work.name}: ids missing"
        assert np.array_equal(a["offsets"][:], b["x/refs"][:]), f"{work.name}: refs differ"
        assert np.array_equal(a["values"][:], b["x/values"][:]), f"{work.name}: values differ"


# -- one run, in a fresh process ----------------------------------------------------------------


def child_workload(folder: str, n: int, n_spin: int) -> Workload:
    """The first ``n`` sources of ``folder``, with the load of its kind."""
    paths = sorted(os.path.join(folder, p) for p in os.listdir(folder))[:n]
    if os.path.basename(folder) == "png":
        feature: h5m.Feature = PngFeature(n_spin)
        return Workload("png", paths, 0, feature.load, feature)
    return Workload(os.path.basename(folder), paths, 0, load_npy, NpyFeature())


def run_child(method: str, folder: str, n: int, out: str, n_spin: int) -> None:
    """Time one build; print ``{"seconds", "peak_mib", "startup"}`` as JSON."""
    import distributed  # noqa: F401 - imports are not the run's time nor memory
    import PIL.Image  # noqa: F401

    work = child_workload(folder, n, n_spin)
    warm = Workload("warm-up", work.paths[:20], 0, work.load, work.feature)
    if method == "h5py":
        plain_h5py(warm.paths, out, warm.load)
        run, startup = timed(lambda: plain_h5py(work.paths, out, work.load)), 0.0
    elif method == "client":
        with started_client() as (client, startup):
            h5dask_create(warm, out, client)
            run = timed(lambda: h5dask_create(work, out, client))
    else:
        h5dask_create(warm, out, "threads")
        scheduler = None if method == "default" else method
        run, startup = timed(lambda: h5dask_create(work, out, scheduler)), 0.0
    print(json.dumps({"seconds": run.seconds, "peak_mib": run.peak_mib, "startup": startup}))


def in_child(method: str, folder: str, n: int, out: str, n_spin: int) -> dict[str, float]:
    os.sync()  # write back the last run's files now, not during this one
    argv = [sys.executable, __file__, "--run", method, folder, str(n), out, str(n_spin)]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{method} on {folder} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def started_client() -> Iterator[tuple[object, float]]:
    import logging

    import distributed

    start = time.perf_counter()
    with (
        distributed.LocalCluster(
            n_workers=N_WORKERS,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.wait_for_workers(N_WORKERS)
        yield client, time.perf_counter() - start


# -- the tables ----------------------------------------------------------------------------------


def bench_workload(work: Workload, tmp: str, repeats: int, n_spin: int) -> dict[str, list[dict]]:
    """Run each method ``repeats`` times: the plain loop first, then the h5dask methods,
    taking turns at going first.

    Each h5dask file is checked against the plain loop's and deleted at once. On
    this machine (a VM), a run that came after three 500 MB files had been kept
    took 1.6-1.9 s for the medium workload instead of 0.5-0.7, whichever method
    it was: its fresh page cache pays for memory the host has to hand over.
    """
    folder = os.path.dirname(work.paths[0])
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    others = METHODS[1:]
    for r in range(repeats):
        reference = os.path.join(tmp, f"{work.name}-h5py-{r}.h5")
        runs["h5py"].append(in_child("h5py", folder, len(work.paths), reference, n_spin))
        for method in others[r % len(others) :] + others[: r % len(others)]:
            out = os.path.join(tmp, f"{work.name}-{method}-{r}.h5")
            runs[method].append(in_child(method, folder, len(work.paths), out, n_spin))
            check_same(work, reference, out)
            os.remove(out)
        os.remove(reference)
    return runs


def print_table(work: Workload, runs: dict[str, list[dict]]) -> None:
    n, mb = len(work.paths), work.nbytes / 1e6
    startup = statistics.median(r["startup"] for r in runs["client"])
    print(
        f"\n{work.name}: {n} sources, {mb:.1f} MB of arrays (cluster start-up {startup:.2f} s, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    print(
        f"{'method':<10}{'seconds':>9}{'src/s':>9}{'MB/s':>8}{'peak MiB':>10}{'ratio':>7}  target"
    )
    ref = statistics.median(r["seconds"] for r in runs["h5py"])
    target_default, target_threads = TARGETS[work.name]
    targets = {"default": target_default, "client": target_default, "threads": target_threads}
    for method in METHODS:
        seconds = statistics.median(r["seconds"] for r in runs[method])
        peak = statistics.median(r["peak_mib"] for r in runs[method])
        target = targets.get(method)
        ratio = ref / seconds
        mark = "" if target is None else (f">= {target}x " + ("ok" if ratio >= target else "MISS"))
        if method == "h5py":
            mark = "reference"
        print(
            f"{method:<10}{seconds:>9.3f}{n / seconds:>9.0f}{mb / seconds:>8.1f}"
            f"{peak:>10.1f}{ratio:>6.2f}x  {mark}"
        )


def bench_memory(root: str, n: int, repeats: int) -> None:
    work = make_npy(root, "many", iter(lambda: (16, 16), None), 10 * n)
    folder = os.path.dirname(work.paths[0])
    out = os.path.join(root, "many.h5")
    print(f"\nwriter's peak RSS growth (MiB), {n} vs {10 * n} sources of (16, 16)")
    print(f"{'method':<10}{n:>10}{10 * n:>10}{'ratio':>8}  target")
    for method in ("h5py", "default", "threads"):
        peaks = [
            statistics.median(
                in_child(method, folder, count, out, 0)["peak_mib"] for _ in range(repeats)
            )
            for count in (n, 10 * n)
        ]
        ratio = peaks[1] / peaks[0]
        mark = "reference" if method == "h5py" else "<= 1.2x " + ("ok" if ratio <= 1.2 else "MISS")
        print(f"{method:<10}{peaks[0]:>10.1f}{peaks[1]:>10.1f}{ratio:>7.2f}x  {mark}")
    os.remove(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer sources, one run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method (median)")
    parser.add_argument("--run", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        method, folder, n, out, n_spin = args.run
        run_child(method, folder, int(n), out, int(n_spin))
        return
    repeats = 1 if args.small else args.repeats
    root = tempfile.mkdtemp(prefix="h5dask-bench-create-")
    try:
        n_spin = calibrate_spin()
        print(f"{N_WORKERS} workers, {os.cpu_count()} cores; PNG work: {n_spin} iterations ~3 ms")
        for work in make_workloads(root, args.small, n_spin):
            print_table(work, bench_workload(work, root, repeats, n_spin))
            shutil.rmtree(os.path.dirname(work.paths[0]))
        bench_memory(root, 2_000 if args.small else 20_000, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
