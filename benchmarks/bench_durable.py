"""The cost of a durable commit (issue 24, "Durability"): fsync on and off.

Each commit is one ``file.add(id, {"x": arr})`` of a (16, 16) float32 array and a
``flush()``, on a file that already holds 1,000 sources, in a folder of the
machine's disk (``--dir``, default the system's temporary folder; on tmpfs a
sync costs nothing). ``h5dask.durable`` on: the journal and its folder are
synced before the file is overwritten, the file before the journal is deleted
(4 ``fsync`` calls a commit); off: none. Also the same with 1,000 adds per
commit. Figures are medians over ``--repeats`` runs of 50 commits (``--small``:
10 commits, 1 run), per commit; the settings take turns.

Run: ``.venv/bin/python benchmarks/bench_durable.py [--small] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dask
import numpy as np

import h5dask as h5m


class Logs(h5m.TypedFile):
    x = h5m.Array()


def commits(folder: Path, durable: bool, n: int, per_commit: int) -> float:
    """Seconds per commit of ``per_commit`` adds, median of ``n`` commits."""
    path = folder / f"c-{durable}.h5"
    array = np.ones((16, 16), np.float32)
    file = Logs(path, mode="w")
    for k in range(1000):
        file.add(f"base{k}", {"x": array})
    file.flush()
    times = []
    with dask.config.set({"h5dask.durable": durable}):
        for c in range(n):
            for k in range(per_commit):
                file.add(f"c{c}-{k}", {"x": array})
            t = time.perf_counter()
            file.flush()
            times.append(time.perf_counter() - t)
    file.close()
    path.unlink()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="a folder on the disk to measure")
    args = parser.parse_args()
    n, repeats = (10, 1) if args.small else (50, args.repeats)
    folder = Path(tempfile.mkdtemp(prefix="bench-durable-", dir=args.dir))
    try:
        print(f"folder: {folder}  (commits of 1 and 1,000 adds, medians of {repeats} runs)")
        print(f"{'adds/commit':>11} {'durable ms':>11} {'not durable ms':>15} {'ratio':>6}")
        for per_commit in (1, 1000):
            runs = {True: [], False: []}
            for r in range(repeats):
                for durable in (True, False) if r % 2 == 0 else (False, True):
                    runs[durable].append(commits(folder, durable, n, per_commit))
            on, off = statistics.median(runs[True]), statistics.median(runs[False])
            print(f"{per_commit:>11} {on * 1e3:>11.2f} {off * 1e3:>15.2f} {on / off:>6.2f}")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
