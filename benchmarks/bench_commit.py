"""The cost of committing by time and of watching for hung loads during ``create`` (issue 23).

``create`` commits per 16 MiB of results and, by default, at least every 2 s
(``commit_seconds``), so that a killed build loses at most a few seconds of
loading; ``timeout=`` runs each partition's loads in a thread of their own,
watched. This script builds the same file with ``commit_seconds=None`` (per
16 MiB and at the end only), with the default 2 s, with 0.5 s, and with the
default and ``timeout=3600``, taking turns, and prints for each the median
wall time, CPU time of the process, number of commits and time spent in them,
and the ratios of wall and CPU time to ``commit_seconds=None``. On a shared
machine wall times vary by 2x from run to run: the time in commits is the
steadiest figure of the cadence's cost.

The sources are generated (no file is read: the writer's share of the time is
as large as it gets): 1 KiB of float32 per source after a short loop in Python,
on ``scheduler="threads"`` with 2 threads. Every run is a fresh process
(modules imported before the clock starts).

Run: ``.venv/bin/python benchmarks/bench_commit.py [--repeats 7] [--sources 150000]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import h5dask as h5m
from h5dask.writer import Writer

VARIANTS = {
    "commit_seconds=None": {"commit_seconds": None},
    "commit_seconds=2 (default)": {},
    "commit_seconds=0.5": {"commit_seconds": 0.5},
    "default, timeout=3600": {"timeout": 3600.0},
}


class Generated(h5m.Feature):
    """256 float32 per source, after about 0.1 ms of work."""

    def load(self, source: str) -> np.ndarray:
        i = int(source)
        total = 0
        for k in range(300):
            total += k
        return np.full(256, i + total, dtype=np.float32)


def run_child(variant: str, n: int, out: str) -> None:
    sources = [str(i) for i in range(n)]
    schema = {"x": Generated()}
    commits: list[float] = []
    flush = Writer.flush

    def timed_flush(self: Writer) -> None:
        start = time.perf_counter()
        pending = self.pending
        flush(self)
        if pending:
            commits.append(time.perf_counter() - start)

    Writer.flush = timed_flush  # type: ignore[method-assign]
    cpu, start = os.times(), time.perf_counter()
    h5m.TypedFile.create(
        out, sources, schema=schema, scheduler="threads", n_workers=2, progress=False,
        **VARIANTS[variant],
    )  # fmt: skip
    elapsed, after = time.perf_counter() - start, os.times()
    assert len(h5m.TypedFile(out)) == n
    used = after.user + after.system - cpu.user - cpu.system
    print(json.dumps({"wall": elapsed, "cpu": used, "commits": commits}))


def in_child(variant: str, n: int, out: str) -> dict:
    args = [sys.executable, __file__, "--run", variant, str(n), out]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    Path(out).unlink()
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs of each variant (median)")
    parser.add_argument("--sources", type=int, default=150_000, help="sources per build")
    parser.add_argument("--run", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        variant, n, out = args.run
        run_child(variant, int(n), out)
        return
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            turn = repeat % len(order)  # each variant goes first in turn
            for variant in order[turn:] + order[:turn]:
                runs[variant].append(in_child(variant, args.sources, f"{tmp}/out.h5"))

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[variant])

    for r in (r for variant in runs.values() for r in variant):
        r["n"], r["in commits"] = len(r["commits"]), sum(r["commits"])
    base = order[0]
    print(f"{args.sources} sources of 1 KiB, threads x2, medians of {args.repeats} runs")
    header = ("variant", "wall s", "cpu s", "commits", "in commits s", "wall ratio", "cpu ratio")
    print("{:>27} {:>7} {:>7} {:>8} {:>13} {:>11} {:>10}".format(*header))
    for variant in order:
        wall, cpu = median(variant, "wall"), median(variant, "cpu")
        print(
            f"{variant:>27} {wall:7.2f} {cpu:7.2f} {median(variant, 'n'):8.0f} "
            f"{median(variant, 'in commits'):13.3f} {wall / median(base, 'wall'):11.3f} "
            f"{cpu / median(base, 'cpu'):10.3f}"
        )


if __name__ == "__main__":
    main()
