"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block.replace("    ...", "    break"), str(README), "exec"), scope)
    exp = scope["exp"]
    np.testing.assert_array_equal(exp.data.squares.get("4"), [0, 1, 4, 9])
    assert len(exp.ids) == 101  # 100 sources and the "train" log
    assert exp.data.squares.attrs == {"power": 2}
    expected = sum(float((np.arange(n, dtype=np.float64) ** 2).sum()) for n in range(1, 101))
    assert float(scope["lazy"].sum().compute()) == expected
    batch = scope["batch"]
    assert tuple(batch["x"].shape) == (32, 8) and tuple(batch["y"].shape) == (32, 1)
