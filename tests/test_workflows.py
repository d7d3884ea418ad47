"""Every workflow runs end to end on small data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"


def run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(WORKFLOWS / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "script",
    ["demo.py", "build_dataset.py", "samples.py", "lazy_analysis.py", "train_with_logs.py"],
)
def test_help(script, tmp_path):
    assert "usage" in run(script, "--help", cwd=tmp_path)


def test_build_dataset_labels_follow_folders(tmp_path):
    run("samples.py", str(tmp_path / "images"), "--per-class", "3", cwd=tmp_path)
    out = run(
        "build_dataset.py",
        str(tmp_path / "images"),
        str(tmp_path / "d.h5"),
        "--size",
        "32",
        "--scheduler",
        "threads",
        cwd=tmp_path,
    )
    assert "18 ids" in out
    with h5py.File(tmp_path / "d.h5") as f:
        ids = f["__src__/id"].asstr()[:]
        vocabulary = list(f["labels"].attrs["vocabulary"].astype(str))
        labels = f["labels/values"][:]
        assert f["images/values"].shape == (18, 32, 32, 3)
    assert vocabulary == sorted(vocabulary) and len(vocabulary) == 6
    names = [Path(i).parent.name for i in ids]
    np.testing.assert_array_equal(labels, [vocabulary.index(n) for n in names])


def test_demo_runs_on_the_embedded_cluster(tmp_path):
    out = run("demo.py", "--out", str(tmp_path / "demo"), "--per-class", "4", cwd=tmp_path)
    assert "24 ids" in out
    assert "mean colour" in out and "brick" in out
    assert "x (16, 1, 64, 64, 3)" in out or "x (16, 64, 64, 3)" in out
    assert str(tmp_path / "demo" / "dataset.h5") in out


def test_lazy_analysis_matches_numpy(tmp_path):
    sys.path.insert(0, str(WORKFLOWS))
    from build_dataset import build
    from lazy_analysis import class_statistics
    from samples import write_samples

    write_samples(tmp_path / "images", per_class=3)
    file = build(
        str(tmp_path / "images"), str(tmp_path / "d.h5"), size=16, scheduler="sync", progress=False
    )
    stats = class_statistics(file)
    with h5py.File(tmp_path / "d.h5") as f:
        pixels = f["images/values"][:].astype(np.float64).reshape(18, -1, 3)
        labels = f["labels/values"][:]
    for k, name in enumerate(file.labels.attrs["vocabulary"]):
        mine = pixels[labels == k]
        assert stats[name]["count"] == len(mine) == 3
        np.testing.assert_allclose(stats[name]["mean"], mine.mean(axis=(0, 1)))
        np.testing.assert_allclose(stats[name]["std"], mine.std(axis=(0, 1)), rtol=1e-6)
    out = run("lazy_analysis.py", str(tmp_path / "d.h5"), "--workers", "1", cwd=tmp_path)
    assert "dask dashboard" in out and "brick" in out


def test_train_with_logs_logs_each_epoch_and_restores_the_best(tmp_path):
    out = run("train_with_logs.py", "--dir", str(tmp_path), "--epochs", "2", cwd=tmp_path)
    with h5py.File(tmp_path / "run.h5") as f:
        ids = f["__src__/id"].asstr()[:].tolist()
        accuracy = f["logs/accuracy/values"][:]
        batches = f["logs/loss/refs"][:]
        weight = f["checkpoints/linear.weight/values"]
        assert ids == ["epoch-0", "epoch-1"]
        assert weight.shape[0] == 2 * weight.shape[0] // 2 and weight.shape[1] == 192
        first, second = weight[: weight.shape[0] // 2], weight[weight.shape[0] // 2 :]
    assert not np.array_equal(first, second)  # each epoch's own checkpoint, not the last one
    assert (batches[:, 1] - batches[:, 0] > 0).all()
    best = ids[int(np.argmax(accuracy))]
    assert f"best: {best}; its checkpoint restored scores {accuracy.max():.3f}" in out
