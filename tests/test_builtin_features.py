"""Unit tests of the built-in features (h5dask.features), on real files.

Every source is written for real (Pillow, soundfile, numpy, torch.save) to a
temporary directory and to fsspec's in-memory filesystem, then loaded back.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
import uuid

import fsspec
import h5py
import numpy as np
import PIL.Image as PIL_Image
import pytest
import soundfile as sf

from h5dask.features import Bytes, DirLabels, Image, Npy, Sound, TensorDict, Text, VShape
from h5dask.features.arrays import decode_strings
from h5dask.features.labels import parent_name
from h5dask.features.sound import resample_linear

LOCATIONS = ["local", "memory"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def memory_root():
    """A fresh root of fsspec's memory filesystem, removed after the test."""
    fs = fsspec.filesystem("memory")
    root = f"h5dask-features-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


@pytest.fixture(params=LOCATIONS)
def put(request, tmp_path, memory_root):
    """``put(relpath, data) -> source``: write bytes locally or in memory://."""
    fs, root = memory_root

    def _put(relpath: str, data: bytes) -> str:
        if request.param == "local":
            path = tmp_path / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return str(path)
        url = f"memory://{root}/{relpath}"
        fs.pipe(url, data)
        return url

    _put.location = request.param
    return _put


def image_bytes(arr: np.ndarray, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    PIL_Image.fromarray(arr).save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def wav_bytes(samples: np.ndarray, sr: int, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# --------------------------------------------------------------------------- Image


def test_image_png_rgb_is_one_item_with_exact_pixels(put, rng):
    pixels = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    source = put("imgs/a.png", image_bytes(pixels, "PNG"))
    out = Image().load(source)
    assert out.shape == (1, 5, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], pixels)


def test_image_jpeg_equals_pillow_decoding(put, rng, tmp_path):
    pixels = rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)
    data = image_bytes(pixels, "JPEG", quality=90)
    source = put("imgs/b.jpeg", data)
    expected = np.asarray(PIL_Image.open(io.BytesIO(data)).convert("RGB"))
    out = Image().load(source)
    assert out.shape == (1, 8, 6, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], expected)


def test_image_mode_and_resize(put, rng):
    pixels = rng.integers(0, 256, (10, 12, 4), dtype=np.uint8)
    data = image_bytes(pixels, "PNG")
    source = put("imgs/c.png", data)
    gray = Image(mode="L").load(source)
    assert gray.shape == (1, 10, 12) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray[0], np.asarray(PIL_Image.fromarray(pixels).convert("L")))

    square = Image(size=4).load(source)
    assert square.shape == (1, 4, 4, 3)
    rect = Image(size=(6, 3), resample="bilinear").load(source)
    assert rect.shape == (1, 3, 6, 3)
    expected = PIL_Image.fromarray(pixels).convert("RGB").resize((6, 3), PIL_Image.BILINEAR)
    np.testing.assert_array_equal(rect[0], np.asarray(expected))


def test_image_attrs_pattern_and_ds_kwargs():
    assert Image().attrs == {"mode": "RGB", "size": None, "resample": "bicubic"}
    assert Image(size=32, mode="L").attrs == {"mode": "L", "size": [32, 32], "resample": "bicubic"}
    assert Image(size=(8, 4)).attrs["size"] == [8, 4]
    assert Image().__ds_kwargs__ == {}
    assert Image(compression="lzf").__ds_kwargs__ == {"compression": "lzf"}
    assert Image.__ds_kwargs__ == {}  # the class default is not mutated
    import re

    feature = Image()
    for name in ["a.png", "b.JPG", "c.jpeg", "d.tif", "e.webp", "s3://b/f.gif"]:
        assert re.search(feature.__re__, name), name
    for name in ["a.wav", "png", "a.png.txt"]:
        assert not re.search(feature.__re__, name), name
    assert Image(pattern=r"\.raw$").__re__ == r"\.raw$"
    with pytest.raises(ValueError):
        Image(size=0)
    with pytest.raises(ValueError):
        Image(resample="magic")


def test_image_corrupt_file_raises(put):
    source = put("imgs/broken.png", b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    with pytest.raises(Exception):  # noqa: B017 - the caller wraps whatever Pillow raises
        Image().load(source)


def test_image_missing_source_raises(tmp_path):
    with pytest.raises(OSError):
        Image().load(str(tmp_path / "nope.png"))


def test_image_plot_returns_figure(rng):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    fig = Image().plot(batch, ncols=2)
    assert len(fig.axes) == 4 and len(fig.axes[0].images) == 1
    plt.close(fig)
    fig = Image(mode="L").plot(batch[0, :, :, 0])
    assert len(fig.axes) == 1
    plt.close(fig)


# --------------------------------------------------------------------------- DirLabels


def test_dirlabels_vocabulary_and_labels_local(tmp_path):
    sources = []
    for name in ["dog", "cat", "bird"]:
        for i in range(2):
            path = tmp_path / "pets" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
            sources.append(str(path))
    sources.append(str(tmp_path / "pets" / "fish" / "notes.txt"))  # not matched
    labels = DirLabels()
    labels.before_create(sources)
    assert labels.vocabulary == ["bird", "cat", "dog"]
    assert labels.attrs == {"vocabulary": ["bird", "cat", "dog"]}
    got = [labels.load(s) for s in sources[:-1]]
    assert all(g.shape == (1,) and g.dtype == np.int64 for g in got)
    assert [int(g[0]) for g in got] == [2, 2, 1, 1, 0, 0]
    assert labels.decode(np.concatenate(got)) == ["dog", "dog", "cat", "cat", "bird", "bird"]
    assert labels.decode(1) == "cat"
    assert labels.decode([0], vocabulary=[b"x", b"y"]) == ["x"]


def test_dirlabels_memory_urls_and_pickle(memory_root):
    fs, root = memory_root
    sources = [f"memory://{root}/{d}/{i}.wav" for d in ["z", "a"] for i in range(2)]
    for s in sources:
        fs.pipe(s, b"")
    labels = DirLabels()
    labels.before_create(sources)
    assert labels.vocabulary == ["a", "z"]
    worker_copy = pickle.loads(pickle.dumps(labels))  # as sent to worker processes
    assert [int(worker_copy.load(s)[0]) for s in sources] == [1, 1, 0, 0]


def test_dirlabels_pattern_fixed_vocabulary_and_errors():
    labels = DirLabels(pattern=r"\.dat$")
    labels.before_create(["x/b/1.dat", "x/a/2.dat", "x/c/3.png"])
    assert labels.vocabulary == ["a", "b"]

    fixed = DirLabels(vocabulary=["z", "y"])
    fixed.before_create(["d/y/1.png", "d/q/2.png"])
    assert fixed.vocabulary == ["z", "y"]
    assert int(fixed.load("d/y/1.png")[0]) == 1
    with pytest.raises(ValueError, match="'q'"):
        fixed.load("d/q/2.png")

    with pytest.raises(RuntimeError, match="before_create"):
        DirLabels().load("d/y/1.png")
    assert DirLabels().attrs == {"vocabulary": []}


@pytest.mark.parametrize(
    "source, expected",
    [
        ("a/b/c.png", "b"),
        ("/abs/dir/x.wav", "dir"),
        ("c.png", ""),
        ("./c.png", ""),
        ("data/./dogs/../cats/1.png", "cats"),
        ("C:\\data\\owls\\1.png", "owls"),
        ("s3://bucket/cats/1.png", "cats"),
        ("https://host/x/dogs/2.jpg?token=a/b#frag", "dogs"),
        ("memory://root/1.png", "root"),
    ],
)
def test_parent_name(source, expected):
    assert parent_name(source) == expected


# --------------------------------------------------------------------------- Npy


def test_npy_array_values_dtype_and_shape(put, rng):
    arr = rng.standard_normal((4, 3)).astype(np.float32)
    out = Npy().load(put("arrays/a.npy", npy_bytes(arr)))
    assert out.shape == (4, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)
    scalar = Npy().load(put("arrays/s.npy", npy_bytes(np.array(7, dtype=np.int16))))
    assert scalar.shape == (1,) and scalar.dtype == np.int16 and scalar[0] == 7


def test_npz_gives_dict(put, rng):
    a = rng.integers(0, 10, (5,), dtype=np.int32)
    b = rng.standard_normal((2, 2))
    buf = io.BytesIO()
    np.savez_compressed(buf, a=a, b=b, c=np.float64(2.5))
    out = Npy().load(put("arrays/d.npz", buf.getvalue()))
    assert sorted(out) == ["a", "b", "c"]
    np.testing.assert_array_equal(out["a"], a)
    assert out["a"].dtype == np.int32
    np.testing.assert_array_equal(out["b"], b)
    assert out["c"].shape == (1,) and out["c"][0] == 2.5


def test_npy_refuses_pickled_objects(put):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        Npy().load(put("arrays/o.npy", buf.getvalue()))


# --------------------------------------------------------------------------- Bytes


def test_bytes_rows_are_the_raw_bytes(put, rng):
    data = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
    feature = Bytes()
    out = feature.load(put("blobs/x.bin", data))
    assert out.shape == (1000,) and out.dtype == np.uint8
    assert out.tobytes() == data and Bytes.tobytes(out) == data
    empty = feature.load(put("blobs/empty.bin", b""))
    assert empty.shape == (0,) and empty.dtype == np.uint8
    assert feature.__ds_kwargs__ == {"dtype": "uint8"}
    assert Bytes(compression="gzip").__ds_kwargs__ == {"dtype": "uint8", "compression": "gzip"}


# --------------------------------------------------------------------------- Text


def test_text_one_str_item(put):
    text = "héllo wörld\nline 2 — ✓\n"
    out = Text().load(put("docs/a.txt", text.encode("utf-8")))
    assert out.shape == (1,) and out.dtype == object
    assert out[0] == text and isinstance(out[0], str)
    latin = Text(encoding="latin-1")
    assert latin.load(put("docs/b.txt", "café".encode("latin-1")))[0] == "café"
    assert latin.attrs == {"encoding": "latin-1", "errors": "strict"}
    with pytest.raises(UnicodeDecodeError):
        Text().load(put("docs/c.txt", "café".encode("latin-1")))
    assert Text(errors="replace").load(put("docs/d.txt", b"caf\xe9"))[0] == "caf\ufffd"


def test_text_storage_dtype_and_read_transform():
    feature = Text()
    assert h5py.check_string_dtype(feature.__ds_kwargs__["dtype"]).encoding == "utf-8"
    read_back = np.array(["é".encode(), b"b"], dtype=object)
    for transform in feature.__t__:
        read_back = transform(read_back)
    assert read_back.tolist() == ["é", "b"]
    assert decode_strings(b"x") == "x" and decode_strings("x") == "x"
    np.testing.assert_array_equal(decode_strings(np.arange(3)), np.arange(3))
    with pytest.raises(LookupError):
        Text(encoding="no-such-codec")


# --------------------------------------------------------------------------- Sound


def test_sound_stereo_and_mono_float(put, rng):
    samples = rng.uniform(-0.9, 0.9, (300, 2)).astype(np.float32)
    source = put("audio/a.wav", wav_bytes(samples, 8000))
    stereo = Sound(mono=False).load(source)
    assert stereo.shape == (300, 2) and stereo.dtype == np.float32
    np.testing.assert_allclose(stereo, samples, atol=1e-7)
    mono = Sound().load(source)
    assert mono.shape == (300,) and mono.dtype == np.float32
    np.testing.assert_allclose(mono, samples.mean(axis=1), atol=1e-6)


def test_sound_pcm16_within_quantization(put, rng):
    samples = rng.uniform(-0.9, 0.9, 200).astype(np.float32)
    out = Sound(mono=False).load(put("audio/b.wav", wav_bytes(samples, 16000, "PCM_16")))
    assert out.shape == (200, 1)
    np.testing.assert_allclose(out[:, 0], samples, atol=1 / 2**15)
    np.testing.assert_allclose(
        Sound(sr=16000).load(put("audio/c.wav", wav_bytes(samples, 16000))), samples
    )


def test_sound_resampling_is_linear_interpolation(put):
    samples = np.linspace(-1, 1, 101, dtype=np.float32) ** 3
    source = put("audio/r.wav", wav_bytes(samples, 8000))
    up = Sound(sr=16000).load(source)
    assert up.shape == (202,) and up.dtype == np.float32
    np.testing.assert_allclose(up[0:202:2], samples, atol=1e-6)  # original sample times
    np.testing.assert_allclose(up[1:200:2], (samples[:-1] + samples[1:]) / 2, atol=1e-6)
    down = Sound(sr=4000).load(source)
    assert down.shape == (50,)  # round(101 / 2) with numpy's banker's rounding
    np.testing.assert_allclose(down, samples[0:100:2], atol=1e-6)
    stereo = np.stack([samples, -samples], axis=1)
    both = resample_linear(stereo, 8000, 16000)
    assert both.shape == (202, 2) and both.dtype == np.float32
    np.testing.assert_allclose(both[:, 1], -both[:, 0])


def test_sound_attrs_and_errors(put):
    assert Sound().attrs == {"sr": None, "mono": True}
    assert Sound(sr=22050, mono=False).attrs == {"sr": 22050, "mono": False}
    assert Sound().__ds_kwargs__ == {"dtype": "float32"}
    with pytest.raises(ValueError):
        Sound(sr=0)
    with pytest.raises(Exception):  # noqa: B017 - the caller wraps whatever soundfile raises
        Sound().load(put("audio/not-audio.wav", b"RIFF....this is not a wave file at all"))


# --------------------------------------------------------------------------- TensorDict


@pytest.fixture
def torch():
    import torch

    return torch


def torch_bytes(obj, torch) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_tensordict_loads_checkpoint_as_numpy(put, torch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    checkpoint = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    out = TensorDict().load(put("ckpt/run.pt", torch_bytes(checkpoint, torch)))

    weights = out["model"]
    assert set(weights) == set(model.state_dict())
    for key, tensor in model.state_dict().items():
        assert isinstance(weights[key], np.ndarray)
        assert weights[key].shape == (tuple(tensor.shape) or (1,))
        np.testing.assert_array_equal(weights[key], np.atleast_1d(tensor.numpy()))
    assert weights["1.num_batches_tracked"].dtype == np.int64
    assert out["epoch"].shape == (1,) and out["epoch"][0] == 3
    momentum = out["optimizer"]["state"]["0"]["momentum_buffer"]
    np.testing.assert_array_equal(momentum, opt.state_dict()["state"][0]["momentum_buffer"])
    assert out["optimizer"]["param_groups"]["0"]["lr"][0] == 0.1


def test_tensordict_read_transform_gives_tensors(torch):
    state = {
        "w": torch.arange(6.0).reshape(2, 3),
        "n": torch.tensor(5),
        "sub": {"b": torch.ones(2)},
    }
    arrays = TensorDict.format(state)
    assert arrays["n"].shape == (1,) and arrays["w"].dtype == np.float32
    read = arrays
    for transform in TensorDict().__grp_t__:
        read = transform(read)
    assert isinstance(read["w"], torch.Tensor) and torch.equal(read["w"], state["w"])
    assert isinstance(read["sub"]["b"], torch.Tensor) and torch.equal(
        read["sub"]["b"], state["sub"]["b"]
    )
    assert read["n"].tolist() == [5]
    bf16 = TensorDict.format({"h": torch.ones(2, dtype=torch.bfloat16)})
    assert bf16["h"].dtype == np.float32


def test_tensordict_template_ds_kwargs_and_safety(put, torch):
    model = torch.nn.Linear(3, 2)
    feature = TensorDict(model.state_dict())
    assert feature.__ds_kwargs__ == {
        "weight": {"compression": "lzf", "chunks": (2, 3)},
        "bias": {"compression": "lzf", "chunks": (2,)},
    }
    assert TensorDict().__ds_kwargs__ == {}
    assert TensorDict().attrs == {}

    # weights_only=True: a pickle that would build arbitrary objects is refused
    unsafe = put("ckpt/unsafe.pt", torch_bytes({"obj": Image()}, torch))
    with pytest.raises(Exception):  # noqa: B017 - torch's UnpicklingError
        TensorDict().load(unsafe)
    with pytest.raises(Exception):  # noqa: B017 - not a checkpoint
        TensorDict().load(put("ckpt/junk.pt", b"junk" * 10))
    single = TensorDict().load(put("ckpt/t.pt", torch_bytes(torch.ones(3), torch)))
    np.testing.assert_array_equal(single["tensor"], np.ones(3, dtype=np.float32))


# --------------------------------------------------------------------------- VShape


def test_vshape_round_trip(put, rng):
    feature = VShape(Npy(compression="gzip", chunks=(4,)))
    assert feature.__re__ == Npy.__re__
    assert feature.__ds_kwargs__ == {"arr": {"compression": "gzip"}, "shape_": {"dtype": "int64"}}
    for i, shape in enumerate([(2, 3, 4), (5,), (1, 7)]):
        arr = rng.standard_normal(shape)
        stored = feature.load(put(f"v/{i}.npy", npy_bytes(arr)))
        assert stored["arr"].shape == (arr.size,) and stored["arr"].dtype == arr.dtype
        assert stored["shape_"].dtype == np.int64
        np.testing.assert_array_equal(stored["shape_"], shape)
        read = stored
        for transform in feature.__grp_t__:
            read = transform(read)
        np.testing.assert_array_equal(read, arr)


def test_vshape_applies_base_transforms_attrs_and_pickles(put):
    base = Text(encoding="ascii")
    feature = VShape(base)
    assert feature.attrs == base.attrs
    stored = feature.load(put("v/t.txt", b"abc"))
    assert stored["shape_"].tolist() == [1]
    as_read = {"arr": np.array([b"abc"], dtype=object), "shape_": stored["shape_"]}
    restored = pickle.loads(pickle.dumps(feature)).__grp_t__[0](as_read)
    assert restored.tolist() == ["abc"]

    labels = VShape(DirLabels())
    labels.before_create(["a/x/1.png", "a/y/2.png"])
    assert labels.attrs == {"vocabulary": ["x", "y"]}
    with pytest.raises(TypeError):
        VShape(np.zeros(3))


# --------------------------------------------------------------------------- optional deps


@pytest.mark.parametrize(
    "modules, call, extra",
    [
        (["PIL", "PIL.Image"], lambda src: Image().load(src), "images"),
        (["soundfile"], lambda src: Sound().load(src), "sound"),
        (["torch"], lambda src: TensorDict().load(src), "torch"),
        (["torch"], lambda src: TensorDict.format({}), "torch"),
    ],
)
def test_missing_extra_names_it(monkeypatch, tmp_path, modules, call, extra):
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    source = tmp_path / "x.bin"
    source.write_bytes(b"")
    with pytest.raises(ImportError, match=rf"pip install h5dask\[{extra}\]"):
        call(str(source))


def test_import_does_not_load_heavy_libraries():
    code = (
        "import sys, h5dask.features as f\n"
        "f.Image(size=8); f.Sound(sr=8000); f.TensorDict(); f.VShape(f.Npy())\n"
        "heavy = {'torch', 'PIL', 'soundfile', 'matplotlib'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
