"""``h5dask info`` on a file of many ids against a plain h5py script (issue 7, "Large files").

The file (1,000,000 ids; ``--small``: 100,000) is written with plain h5py in
the h5dask format: ids in ``/__src__/id`` (variable-length UTF-8), a feature
``data/x`` of (1..4, 8) float32 arrays (gzip) for every id and a feature
``data/label`` of one int64 for every other id, each with ``values`` and
``refs``.

Compared, each in a fresh process (so imports count, as they do for a user):

- ``python -m h5dask info FILE`` against a plain h5py script printing the
  same metadata (id count, first ids, per feature dtype, rows, ids with data,
  size on disk, compression, attrs, each shown id's shape). Target: about a
  second.
- In one process, after imports: ``file.info()`` (the same table) and, apart,
  loading the whole id index (``file.ids``, an :class:`~h5dask.index.IdIndex`),
  which ``info`` does not need; it is what ``show`` and ``get`` pay once.

Figures are medians of 3 runs (``--small``: 1 run).

Run: ``.venv/bin/python benchmarks/bench_info.py [--small]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

TARGET_SECONDS = 1.0

PLAIN = """
import sys, h5py, numpy as np
with h5py.File(sys.argv[1], "r") as f:
    ids = f["__src__/id"]
    n = ids.shape[0]
    shown = [s.decode() for s in ids[:5]]
    print(n, "ids:", *shown)
    def visit(name, obj):
        if isinstance(obj, h5py.Group) and "refs" in obj and "values" in obj:
            values, refs = obj["values"], obj["refs"][:]
            have = refs[:, 0] >= 0
            cells = [str((int(b - a), *values.shape[1:])) if a >= 0 else "None"
                     for a, b in refs[:5]]
            print(name, values.dtype, values.shape[0], int(have.sum()),
                  values.id.get_storage_size(), values.compression, dict(obj.attrs), *cells)
    f.visititems(visit)
"""

INFO_IN_PROCESS = """
import sys, time, contextlib, io
import h5dask as h5m
file = h5m.TypedFile(sys.argv[1])
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    file.info()
info = time.perf_counter() - start
start = time.perf_counter()
file.ids
print(info, time.perf_counter() - start)
"""


def build(path: Path, n: int) -> None:
    """Write an h5dask-format file of ``n`` ids with plain h5py."""
    rng = np.random.default_rng(0)
    ids = np.array([f"dir{i % 1000:03d}/file{i:07d}.npy" for i in range(n)], dtype=object)
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "h5dask"
        f.attrs["format_version"] = 1
        f.create_dataset(
            "__src__/id", data=ids, dtype=h5py.string_dtype(), maxshape=(None,), chunks=(16384,)
        )
        lengths = np.arange(n) % 4 + 1
        stops = np.cumsum(lengths)
        values = rng.random((int(stops[-1]), 8), dtype=np.float32)
        feature(f, "data/x", values, np.stack([stops - lengths, stops], 1), compression="gzip")
        f["data/x"].attrs["size"] = 8
        half = np.arange((n + 1) // 2)
        refs = np.full((n, 2), -1, dtype=np.int64)
        refs[::2] = np.stack([half, half + 1], 1)
        feature(f, "data/label", half.astype(np.int64), refs)


def feature(f: h5py.File, path: str, values: np.ndarray, refs: np.ndarray, **kwargs) -> None:
    group = f.create_group(path)
    rows = max(1, (1 << 20) // max(1, values[0].nbytes))
    group.create_dataset(
        "values",
        data=values,
        maxshape=(None, *values.shape[1:]),
        chunks=(rows, *values.shape[1:]),
        **kwargs,
    )
    group.create_dataset(
        "refs", data=refs.astype(np.int64), maxshape=(None, 2), chunks=(16384, 2), fillvalue=-1
    )


def timed(cmd: list[str], runs: int) -> tuple[float, str]:
    """Median wall time of ``cmd`` in a fresh process, and its last output."""
    times, out = [], ""
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def in_process(path: Path, runs: int) -> tuple[float, float]:
    """Medians of ``file.info()`` and of loading the id index, after imports."""
    results = []
    for _ in range(runs):
        out = subprocess.run(
            [sys.executable, "-c", INFO_IN_PROCESS, str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        results.append([float(x) for x in out.split()])
    info, index = zip(*results, strict=True)
    return statistics.median(info), statistics.median(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="100,000 ids, one run")
    args = parser.parse_args()
    n, runs = (100_000, 1) if args.small else (1_000_000, 3)
    folder = Path(tempfile.mkdtemp(prefix="bench_info_"))
    try:
        path = folder / "many.h5"
        start = time.perf_counter()
        build(path, n)
        size = path.stat().st_size / 2**20
        print(f"{n:,} ids, {size:.0f} MiB, written in {time.perf_counter() - start:.1f} s")
        report(path, runs)
    finally:
        shutil.rmtree(folder)


def report(path: Path, runs: int) -> None:
    python = sys.executable
    imports, _ = timed([python, "-c", "import h5dask.cli"], runs)
    plain, _ = timed([python, "-c", PLAIN, str(path)], runs)
    cli, table = timed([python, "-m", "h5dask", "info", str(path)], runs)
    info, index = in_process(path, runs)
    print(table)
    print(f"{'medians of ' + str(runs):<44}{'seconds':>8}")
    print(f"{'plain h5py script (fresh process)':<44}{plain:>8.3f}")
    print(f"{'h5dask info FILE (fresh process)':<44}{cli:>8.3f}   ratio {cli / plain:.2f}x")
    print(f"{'  of which python + import h5dask.cli':<44}{imports:>8.3f}")
    print(f"{'file.info() in process':<44}{info:>8.3f}")
    print(f"{'file.ids (whole IdIndex; not used by info)':<44}{index:>8.3f}")
    verdict = "met" if cli <= TARGET_SECONDS * 1.2 else "missed"
    print(f"target: h5dask info in about {TARGET_SECONDS:.0f} s: {verdict}")


if __name__ == "__main__":
    main()
