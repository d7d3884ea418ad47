"""Run every ``bench_*.py`` of this folder with ``--small``, each in its own process.

Used by ``make bench``. Exits with a non-zero status if any script failed.

Run: ``.venv/bin/python benchmarks/run_all.py [extra args passed to every script]``
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    scripts = sorted(Path(__file__).resolve().parent.glob("bench_*.py"))
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} --small", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(script), "--small", *sys.argv[1:]]).returncode
        print(f"=== {script.name}: exit {code} in {time.perf_counter() - start:.1f} s", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
