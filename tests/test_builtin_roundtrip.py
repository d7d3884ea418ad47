"""Every built-in feature round-trips real files through a whole typed file.

Real PNG, JPEG, WAV, .npy, .npz, text, binary and torch checkpoint files are
written to a folder of class folders (and to ``memory://``), built into one
typed file by ``create``, and read back: each source's data equals what the
feature loads from it directly, and the file holds what plain h5py expects.
"""

from __future__ import annotations

import io

import fsspec
import h5py
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image as PILImage

import h5dask as h5m
from h5dask.features import Bytes, DirLabels, Image, Npy, Sound, TensorDict, Text, VShape


class Everything(h5m.TypedFile):
    image = Image(size=16)
    label = DirLabels()
    npy = Npy(pattern=r"\.npy$")
    npz = Npy(pattern=r"\.npz$")
    sound = Sound(sr=8000)
    text = Text()
    raw = Bytes(pattern=r"\.bin$")
    state = TensorDict()
    shaped = VShape(Npy(pattern=r"\.npy$"))


def payloads(seed: int = 0) -> dict[str, bytes]:
    """Real files by relative path: two classes of images and sounds, and one of each other."""
    rng = np.random.default_rng(seed)
    files = {}
    for cls in ("cats", "dogs"):
        for k in range(3):
            pixels = rng.integers(0, 255, (20 + k, 24, 3), dtype=np.uint8)
            buf = io.BytesIO()
            PILImage.fromarray(pixels).save(buf, format="PNG" if k else "JPEG")
            files[f"{cls}/{k}.{'png' if k else 'jpg'}"] = buf.getvalue()
        buf = io.BytesIO()
        sf.write(buf, rng.uniform(-1, 1, (800, 2)).astype("f4"), 16000, format="WAV")
        files[f"{cls}/bark.wav"] = buf.getvalue()
    buf = io.BytesIO()
    np.save(buf, rng.normal(size=(3, 4, 5)).astype("f4"))
    files["arrays/a.npy"] = buf.getvalue()
    buf = io.BytesIO()
    np.savez(buf, x=np.arange(6.0), y=np.ones((2, 2), dtype="i4"))
    files["arrays/b.npz"] = buf.getvalue()
    files["notes/readme.txt"] = "héllo, wörld\n".encode()
    files["blobs/data.bin"] = bytes(range(256)) * 3
    buf = io.BytesIO()
    torch.save(torch.nn.Linear(3, 2).state_dict(), buf)
    files["ckpt/model.pt"] = buf.getvalue()
    return files


@pytest.fixture(params=["local", "memory"])
def source_root(request, tmp_path):
    files = payloads()
    if request.param == "local":
        for name, data in files.items():
            (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "src" / name).write_bytes(data)
        yield str(tmp_path / "src")
        return
    fs, root = fsspec.filesystem("memory"), f"/roundtrip-{tmp_path.name}"
    for name, data in files.items():
        fs.pipe(f"memory://{root}/{name}", data)
    yield f"memory://{root}/"
    fs.rm(root, recursive=True)


def equal(stored, direct) -> bool:
    if isinstance(direct, dict):
        return stored.keys() == direct.keys() and all(equal(stored[k], direct[k]) for k in direct)
    if isinstance(stored, torch.Tensor):
        stored = stored.numpy()
    return np.array_equal(np.asarray(stored), np.asarray(direct))


def test_every_builtin_feature_round_trips_through_a_file(tmp_path, source_root):
    file = Everything.create(tmp_path / "all.h5", source_root, scheduler="threads", progress=False)
    assert len(file.ids) == len(payloads())
    assert file.label.attrs["vocabulary"] == ["cats", "dogs"]
    for id in file.ids.tolist():
        stored = file.get(id)
        direct = Everything.load(id)  # what create ran on this source, without writing
        assert stored.keys() == direct.keys(), id
        for name, value in direct.items():
            if name == "shaped":  # stored flat with its shape, read back reshaped
                value = value["arr"].reshape(value["shape_"])
                assert stored[name].shape == Everything.load(id, {"n": Npy()})["n"].shape
            if name == "state":  # read back as torch tensors
                assert all(isinstance(t, torch.Tensor) for t in stored[name].values())
            assert equal(stored[name], value), (name, id)
    with h5py.File(tmp_path / "all.h5") as f:
        assert f["image/values"].shape[1:] == (16, 16, 3) and f["image/values"].dtype == np.uint8
        assert f["sound/values"].dtype == np.float32 and f.attrs["format"] == "h5dask"
        text = f["text/values"].asstr()[:].tolist()
        assert text == ["héllo, wörld\n"]
        assert bytes(f["raw/values"][:]) == bytes(range(256)) * 3
        assert sorted(f["npz"]) == ["x", "y"] and sorted(f["state"]) == ["bias", "weight"]
    assert file.label.decode(file.label[:], vocabulary=file.label.attrs["vocabulary"]) == [
        "cats",
        "cats",
        "cats",
        "cats",
        "dogs",
        "dogs",
        "dogs",
        "dogs",
    ]


def test_dirlabels_decode_through_a_proxy_uses_that_files_vocabulary(tmp_path):
    """The class's feature object holds the last build's vocabulary; each file has its own."""

    class Labeled(h5m.TypedFile):
        label = DirLabels()

    for name, classes in {"first": ["cat", "dog"], "second": ["ant", "bee", "cow"]}.items():
        for c in classes:
            (tmp_path / name / c).mkdir(parents=True)
            (tmp_path / name / c / "x.jpg").write_bytes(b"")
    Labeled.create(tmp_path / "first.h5", str(tmp_path / "first"), scheduler="sync")
    Labeled.create(tmp_path / "second.h5", str(tmp_path / "second"), scheduler="sync")
    assert Labeled.label.vocabulary == ["ant", "bee", "cow"]  # the last build's
    first = Labeled(tmp_path / "first.h5")
    ids = list(first.index)
    decoded = first.label.decode([int(first.label.get(id)[0]) for id in ids])
    assert decoded == [id.split("/")[-2] for id in ids] == ["cat", "dog"]
    assert first.label.vocabulary == ["cat", "dog"]
