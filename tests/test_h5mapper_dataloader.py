"""h5mapper's README example: a created ``keep_open`` file as a torch Dataset in DataLoader workers.

``ds = MyDS.create("train.h5", sources, keep_open=True)`` then
``DataLoader(ds, batch_size=16, num_workers=..., pin_memory=True)``, with fork
and spawn workers, before and after the parent read through its kept handle.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import h5dask as h5m
from h5dask.errors import FileFormatError

N_SOURCES = 40


class MyInputFeature(h5m.Feature):
    def __init__(self, width: int = 3):
        self.width = width

    def load(self, source):
        return np.full((2, self.width), float(source), dtype=np.float32)


class Labels(h5m.Feature):
    def load(self, source):
        return np.array([int(source)])


class MyDS(h5m.TypedFile, torch.utils.data.Dataset):
    x = MyInputFeature(3)
    labels = Labels()

    def __getitem__(self, item):
        return self.x[item], self.labels[item // 2]

    def __len__(self):
        return len(self.x)


SOURCES = [str(i) for i in range(N_SOURCES)]


def epoch(ds, context: str) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "'pin_memory' argument is set as true")
        dl = DataLoader(
            ds, batch_size=16, num_workers=2, pin_memory=True, multiprocessing_context=context
        )
        batches = list(dl)
    return (torch.cat([x for x, _ in batches]).numpy(), torch.cat([y for _, y in batches]).numpy())


def check(x: np.ndarray, labels: np.ndarray) -> None:
    rows = np.repeat(np.arange(N_SOURCES), 2)
    assert np.array_equal(x, np.repeat(rows[:, None], 3, axis=1).astype(np.float32))
    assert np.array_equal(labels.ravel(), rows)  # sample i is source i // 2


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("read_first", [False, True], ids=["fresh", "after-parent-read"])
def test_created_keep_open_file_in_dataloader_workers(tmp_path, monkeypatch, context, read_first):
    monkeypatch.chdir(tmp_path)
    ds = MyDS.create("train.h5", SOURCES, keep_open=True)  # the default engine, as written
    if read_first:
        assert np.array_equal(ds[10][0], np.full(3, 5.0, dtype=np.float32))
    check(*epoch(ds, context))
    assert np.array_equal(ds[79][0], np.full(3, 39.0, dtype=np.float32))  # parent still reads


def test_kept_reader_lets_another_process_read(tmp_path):
    """After a read through its kept handle the parent holds no write lock."""
    path = str(tmp_path / "train.h5")
    ds = MyDS.create(path, SOURCES, keep_open=True, scheduler="threads", progress=False)
    assert ds.labels[3] == 3 and ds._handle.is_open
    code = f"import h5py; print(h5py.File({path!r}, 'r')['labels/values'].shape)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "(40,)", out.stderr


def test_worker_of_a_parent_that_keeps_the_file_for_writing_says_so(tmp_path):
    """A parent that wrote through its kept handle holds the write lock: a clear error."""
    path = str(tmp_path / "train.h5")
    ds = MyDS.create(path, SOURCES, keep_open=True, scheduler="threads", progress=False)
    ds.x[0] = np.zeros(3, dtype=np.float32)  # the kept handle is now open for writing
    with pytest.raises(FileFormatError, match="another process is writing it"):
        epoch(ds, "fork")
    ds.close()  # lets go of the write lock; the next read reopens read-only
    x, labels = epoch(ds, "fork")
    assert np.array_equal(x[0], np.zeros(3, dtype=np.float32)) and labels[0] == 0
