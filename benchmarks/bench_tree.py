"""``h5dask ls -r`` and ``h5dask info`` on wide and deep trees of groups (issue 24).

The files are written with plain h5py in the h5dask format, one id and no feature: 200
groups of 199 groups each (40,000 groups; ``--small``: 100 of 99, 10,000), and 2,000 nested
levels (under the limit of
``format.MAX_DEPTH``). Each command runs in a fresh process (imports count) against a
plain h5py script visiting every link (``Group.visit_links``). One run each.

Run: ``.venv/bin/python benchmarks/bench_tree.py [--small] [--timeout S]``
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

PLAIN = "import h5py, sys; n = []; h5py.File(sys.argv[1]).visit_links(n.append); print(len(n))"


def write(path: Path, wide: int) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["format"], f.attrs["format_version"] = "h5dask", 1
        f.create_dataset(
            "__src__/id", data=np.array(["a"], dtype=object), dtype=h5py.string_dtype()
        )
        if wide:
            for i in range(wide):
                group = f.create_group(f"g{i}")
                for j in range(wide - 1):
                    group.create_group(f"h{j}")
        else:
            f.create_group("/".join(["d"] * 2000))
    return path


def seconds(command: list[str], timeout: float) -> str:
    start = time.perf_counter()
    try:
        subprocess.run(command, capture_output=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return f"> {timeout:.0f} s"
    return f"{time.perf_counter() - start:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--small", action="store_true", help="10,000 groups, not 40,000")
    args = parser.parse_args()
    side = 100 if args.small else 200
    with tempfile.TemporaryDirectory() as tmp:
        for name, wide in ((f"{side * side:,} groups", side), ("2,000 levels", 0)):
            path = str(write(Path(tmp) / "tree.h5", wide))
            h5dask = [sys.executable, "-m", "h5dask"]
            row = [
                seconds(h5dask + ["ls", "-r", path], args.timeout),
                seconds(h5dask + ["info", path], args.timeout),
                seconds([sys.executable, "-c", PLAIN, path], args.timeout),
            ]
            print(f"{name}: ls -r {row[0]}, info {row[1]}, plain h5py visit_links {row[2]}")


if __name__ == "__main__":
    main()
