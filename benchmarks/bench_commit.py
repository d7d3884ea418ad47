"""The cost of committing by time during ``create`` (issue 23, "A kill loses the whole build").

``create`` commits per 16 MiB of results and, by default, at least every 2 s
(``commit_seconds``), so that a killed build loses at most a few seconds of
loading. This script builds the same file with ``commit_seconds=None`` (per
16 MiB and at the end only), with the default 2 s and with 0.5 s, the three
taking turns, and prints the median time of each and its ratio to ``None``.

The sources are generated (no file is read: the writer's share of the time is
as large as it gets): 1 KiB of float32 per source, 1.6 MB/s of loading per
worker thread spent in a spin loop, on ``scheduler="threads"`` with 2 threads.
Every run is a fresh process (modules imported before the clock starts).

Run: ``.venv/bin/python benchmarks/bench_commit.py [--repeats 5] [--sources 60000]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import h5dask as h5m

CADENCES = {"None": None, "2.0": 2.0, "0.5": 0.5}


class Generated(h5m.Feature):
    """256 float32 per source, after about 0.1 ms of work."""

    def load(self, source: str) -> np.ndarray:
        i = int(source)
        total = 0
        for k in range(300):
            total += k
        return np.full(256, i + total, dtype=np.float32)


def run_child(cadence: str, n: int, out: str) -> None:
    seconds = CADENCES[cadence]
    sources = [str(i) for i in range(n)]
    schema = {"x": Generated()}
    start = time.perf_counter()
    h5m.TypedFile.create(
        out, sources, schema=schema, scheduler="threads", n_workers=2, progress=False,
        commit_seconds=seconds,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    assert len(h5m.TypedFile(out)) == n
    print(json.dumps({"seconds": elapsed}))


def in_child(cadence: str, n: int, out: str) -> float:
    args = [sys.executable, __file__, "--run", cadence, str(n), out]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    Path(out).unlink()
    return json.loads(done.stdout.splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each cadence (median)")
    parser.add_argument("--sources", type=int, default=60_000, help="sources per build")
    parser.add_argument("--run", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        cadence, n, out = args.run
        run_child(cadence, int(n), out)
        return
    times: dict[str, list[float]] = {c: [] for c in CADENCES}
    with tempfile.TemporaryDirectory() as tmp:
        order = list(CADENCES)
        for repeat in range(args.repeats):
            for cadence in order[repeat % 3 :] + order[: repeat % 3]:  # each goes first in turn
                times[cadence].append(in_child(cadence, args.sources, f"{tmp}/{cadence}.h5"))
    base = statistics.median(times["None"])
    print(f"{args.sources} sources of 1 KiB, threads x2, medians of {args.repeats} runs")
    print(f"{'commit_seconds':>15} {'median s':>9} {'min s':>7} {'max s':>7} {'ratio':>6}")
    for cadence, runs in times.items():
        median = statistics.median(runs)
        print(
            f"{cadence:>15} {median:9.2f} {min(runs):7.2f} {max(runs):7.2f} {median / base:6.3f}"
        )


if __name__ == "__main__":
    main()
