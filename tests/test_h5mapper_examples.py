"""h5mapper 0.3.3's two examples run with only their import line changed.

Each runs as a subprocess, as a user would run it, with ``import h5mapper as h5m``
replaced by ``import h5dask as h5m`` and its sizes shrunk through its own
constants. The examples are read from h5mapper's source tree
(``$H5MAPPER_EXAMPLES``, default: the project's reference copy), never copied.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path("shared", "reference", "h5mapper-0.3.3", "examples")
# shared/ lies beside the clone (in CI, and in the main work tree)
EXAMPLES = Path(
    os.environ.get(
        "H5MAPPER_EXAMPLES",
        next(
            (p for p in (ROOT.parent / REFERENCE, ROOT.parents[1] / REFERENCE) if p.is_dir()),
            ROOT.parent / REFERENCE,
        ),
    )
)
pytestmark = pytest.mark.skipif(
    not EXAMPLES.is_dir(), reason=f"h5mapper's examples are not at {EXAMPLES}"
)


def ported(name: str, tmp_path: Path, **constants: str) -> Path:
    """The example with its import line and the given ``NAME = value`` lines replaced."""
    text = (EXAMPLES / name).read_text()
    text, n = re.subn(r"^import h5mapper as h5m$", "import h5dask as h5m", text, flags=re.M)
    assert n == 1, f"{name}: no `import h5mapper as h5m` line"
    for constant, value in constants.items():
        text, n = re.subn(rf"^{constant} = .*$", f"{constant} = {value}", text, flags=re.M)
        assert n == 1, f"{name}: no constant {constant}"
    path = tmp_path / name
    path.write_text(text)
    return path


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    # a headless matplotlib; one torch thread a process: its threads spin on 2 shared cores
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def test_dataset_and_logs(tmp_path):
    """Builds a dataset, trains from it in 2 fork DataLoader workers while logging with
    iset and add, checkpoints, then reports (info, plots, __src__.id[refs[()]...])."""
    # 20 epochs is the fewest whose report() works: it plots 2 checkpoints (epochs 9 and 19)
    script = ported("dataset_and_logs.py", tmp_path, MAX_EPOCHS="20")
    out = run([str(script)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "data/xi" in out.stdout and "ckpts/fc1.weight" in out.stdout  # both info() tables
    assert re.search(r"\b100 ids\b", out.stdout)  # 100 .exm sources, the .nope ones filtered
    assert not (tmp_path / "train.h5").exists() and not (tmp_path / "logs.h5").exists()


DRIVER = """
import runpy
import numpy as np
import h5py

example = runpy.run_path("benchmark_serve.py", run_name="benchmark_serve")
for keep_open in (True, False):
    file, loader = example["get_loader"](compression="lzf", slice_length=16, keep_open=keep_open)
    with h5py.File("bench-serve.h5", "r") as f:
        x = f["x/values"][()]
    batches = iter(loader)
    for _ in range(2):
        batch = next(batches)
        assert sorted(batch) == ["x", "y", "z"], sorted(batch)
        assert all(batch[k].shape == (16, 16, example["D"]) for k in batch)
        for item in batch["x"].numpy():  # each item is one source's region of x
            row = int(np.flatnonzero((x == item[0]).all(axis=1))[0])
            assert row % 16 == 0 and np.array_equal(x[row : row + 16], item)
    del batches
    file.close()
    print("served", keep_open, len(loader))
"""


def test_benchmark_serve(tmp_path):
    """get_loader as the example defines it: 8,000 sources, 16 workers, three GetId items."""
    ported("benchmark_serve.py", tmp_path, D="4")
    (tmp_path / "driver.py").write_text(DRIVER)
    out = run(["driver.py"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["served", "True", "500", "served", "False", "500"]
