"""Scripts without ``if __name__ == "__main__":`` (as h5mapper's are) build with every scheduler."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import numpy as np
import h5dask as h5m


class X(h5m.Feature):
    def load(self, source):
        return np.full(3, float(source))


class Data(h5m.TypedFile):
    x = X()


scheduler = None if sys.argv[1] == "default" else sys.argv[1]
f = Data.create("unguarded.h5", [str(i) for i in range(12)], scheduler=scheduler, n_workers=2,
                progress=False)
print("built", float(f.x[:].sum()), flush=True)
if len(sys.argv) > 2:
    print("bag", sum(float(v.sum()) for _, v in f.x.to_bag().compute(scheduler=sys.argv[2])))
"""


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def stored(tmp_path: Path) -> np.ndarray:
    with h5py.File(tmp_path / "unguarded.h5", "r") as f:
        return f["x/values"][()]


@pytest.mark.parametrize("scheduler", ["default", "processes", "threads", "sync"])
def test_unguarded_script_builds(tmp_path, scheduler):
    out = run(tmp_path, scheduler)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"built {3.0 * sum(range(12))}"]  # built once, not per child
    assert "Traceback" not in out.stderr, out.stderr
    assert np.array_equal(stored(tmp_path), np.repeat(np.arange(12.0), 3))


def test_unguarded_dask_processes_compute_says_what_to_add(tmp_path):
    """dask's own process pool re-runs the script in each child: one clear error there,
    and the child does not rebuild (truncate) the parent's file."""
    out = run(tmp_path, "threads", "processes")
    assert out.returncode != 0
    assert out.stdout.splitlines() == [f"built {3.0 * sum(range(12))}"]
    assert "H5DaskError: Data.create('unguarded.h5') runs again in a child process" in out.stderr
    assert 'Put the code that builds and computes under `if __name__ == "__main__":`' in out.stderr
    assert np.array_equal(stored(tmp_path), np.repeat(np.arange(12.0), 3))
