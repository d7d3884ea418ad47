"""Reading and converting files written by h5mapper, against plain h5py.

Builds an h5mapper-layout file (per feature ``__arr__`` chunked as its first array,
``__ref__`` one region reference per id, ids in ``/__src__/id``) with plain h5py,
then times, each in a fresh process: opening it and reading a feature's ref table
(region references -> ``[start, stop)`` rows), ``get`` of every id, ``h5dask convert``,
and a plain h5py loop that dereferences every region reference.

    python benchmarks/bench_convert.py [--small]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

ROWS = 8  # rows of each id's array, 32 float32 each: 1 KiB


def build(path: Path, n: int) -> None:
    utf8 = h5py.string_dtype(encoding="utf-8")
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "__src__/id",
            data=np.array([f"{i}.npy" for i in range(n)], dtype=object),
            dtype=utf8,
            maxshape=(None,),
            chunks=(1,),
        )
        f.create_dataset("__src__/ds_keys", data=np.array(["x", "y"], dtype=object), dtype=utf8)
        for name in ("x", "y"):
            arr = f.create_dataset(
                f"{name}/__arr__",
                data=np.random.rand(n * ROWS, 32).astype("f4"),
                maxshape=(None, 32),
                chunks=(ROWS, 32),
            )
            refs = f.create_dataset(
                f"{name}/__ref__", (n,), dtype=h5py.regionref_dtype, maxshape=(None,), chunks=(1,)
            )
            refs[:] = [arr.regionref[i * ROWS : (i + 1) * ROWS] for i in range(n)]


CASES = {
    "open + ref table": "import h5dask as h5m; h5m.TypedFile(OLD).x.refs.array",
    "get every id (2 features)": (
        "import h5dask as h5m\nf = h5m.TypedFile(OLD, keep_open=True)\n"
        "for i in f.ids.tolist(): f.x.get(i); f.y.get(i)"
    ),
    "h5dask convert": "from h5dask.legacy import convert; convert(OLD, NEW)",
    "plain h5py: dereference every ref (2 features)": (
        "import h5py\nwith h5py.File(OLD, 'r') as f:\n"
        "    for name in ('x', 'y'):\n        arr = f[name + '/__arr__']\n"
        "        for ref in f[name + '/__ref__'][:]:\n            arr[ref]"
    ),
}


def timed(code: str, old: Path, new: Path) -> float:
    new.unlink(missing_ok=True)
    prelude = (
        f"OLD, NEW = {str(old)!r}, {str(new)!r}\nimport time, h5py, h5dask, h5dask.legacy\n"
        "t = time.perf_counter()\n"
    )  # imports are not timed
    script = prelude + code + "\nprint(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2,000 ids, one run")
    args = parser.parse_args()
    n, repeats = (2_000, 1) if args.small else (20_000, 3)
    with tempfile.TemporaryDirectory() as tmp:
        old, new = Path(tmp) / "h5mapper.h5", Path(tmp) / "h5dask.h5"
        build(old, n)
        print(f"{n:,} ids, 2 features of {ROWS}x32 float32 an id; medians of {repeats}")
        for name, code in CASES.items():
            seconds = statistics.median(timed(code, old, new) for _ in range(repeats))
            print(f"  {name:48s} {seconds:8.3f} s  {n / seconds:10,.0f} ids/s")


if __name__ == "__main__":
    main()
