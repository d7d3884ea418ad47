"""The bad input catalogue of issue 8, beyond tests/test_errors.py and tests/test_create.py.

Each bad input is a clear error naming the source, the feature and the cause, or a failure
recorded with ``on_error="skip"``; the file left behind always reads back with plain h5py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image as PILImage

import h5dask as h5m
from h5dask.errors import H5DaskError, LoadError, SourceError
from h5dask.sources import expand_sources


class Kind(h5m.Feature):
    """``raise-*`` raises, ``list-*`` returns a list, ``wide-*`` a wider row; else one row."""

    __re__ = r"^(ok|raise|list|wide)-"

    def load(self, source):
        if source.startswith("raise"):
            raise RuntimeError(f"cannot read {source}")
        if source.startswith("list"):
            return [1, 2]
        return np.ones((1, 4 if source.startswith("wide") else 3), dtype=np.float32)


class Row(h5m.Feature):
    """One row holding the id's length, for any source."""

    def load(self, source):
        return np.array([[len(source)]], dtype=np.int64)


class Big(h5m.Feature):
    """One MiB of float32 holding the source's integer."""

    def load(self, source):
        return np.full((1, 1 << 18), int(source), dtype=np.float32)


def build(path, sources, schema, **kwargs):
    kwargs.setdefault("scheduler", "sync")
    return h5m.TypedFile.create(path, sources, schema=schema, progress=False, **kwargs)


def plain_read(path) -> dict[str, list]:
    """Every committed id's data of every feature, read with plain h5py only."""
    out = {}
    with h5py.File(path, "r") as f:
        ids = f["__src__/id"].asstr()[()].tolist()
        for name in ("image", "kind", "row", "big"):
            if f.get(f"{name}/refs") is None:
                continue
            refs, values = f[f"{name}/refs"][: len(ids)], f[f"{name}/values"]
            out[name] = [None if a < 0 else values[a:b] for a, b in refs.tolist()]
    out["ids"] = ids
    return out


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    for i in range(3):
        PILImage.new("L", (4, 4), color=i * 40).save(root / f"{i}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_a_corrupt_image_names_source_feature_and_cause(tmp_path, images):
    sources = [str(images / "0.png"), str(images / "corrupt.png"), str(images / "1.png")]
    path = tmp_path / "c.h5"
    with pytest.raises(LoadError) as info:
        build(path, sources, {"image": h5m.features.Image()})
    assert (info.value.source, info.value.feature) == (sources[1], "image")
    assert "corrupt.png" in str(info.value) and "'image'" in str(info.value)
    assert "UnidentifiedImageError" in str(info.value)
    read = plain_read(path)
    assert read["ids"] == sources[:1] and read["image"][0].shape == (1, 4, 4, 3)


def test_every_kind_of_bad_source_is_recorded_with_skip(tmp_path, images, dead_url):
    good = [str(images / f"{i}.png") for i in range(3)]
    bad = {
        str(images / "corrupt.png"): ("image", "UnidentifiedImageError"),
        str(images / "missing.png"): ("image", "missing.png"),
        f"{dead_url}/x.png": ("image", "127.0.0.1"),
        "raise-1": ("kind", "RuntimeError: cannot read raise-1"),
        "list-1": ("kind", "list"),
        "wide-1": ("kind", "(1, 4)"),
    }
    sources = ["ok-0", good[0], *bad, good[1], "ok-1", good[2]]
    schema = {"image": h5m.features.Image(), "kind": Kind()}
    file = build(tmp_path / "s.h5", sources, schema, on_error="skip", scheduler="threads")
    failures = {e.source: (e.feature, e.message) for e in file.errors}
    assert set(failures) == set(bad)
    for source, (feature, cause) in bad.items():
        assert failures[source][0] == feature and cause in failures[source][1], failures[source]
    read = plain_read(file.filename)
    assert read["ids"] == ["ok-0", good[0], good[1], "ok-1", good[2]]
    assert [None if a is None else int(a[0, 0, 0, 0]) for a in read["image"]] == [
        None, 0, 40, None, 80
    ]  # fmt: skip
    assert file.image.get(good[2])[0, 0, 0, 0] == 80


def test_duplicate_sources_are_dropped_with_a_warning(tmp_path):
    sources = ["a", "b", "a", "c", "b", "a"]
    with pytest.warns(UserWarning, match="dropped 3 duplicate source ids"):
        file = build(tmp_path / "d.h5", sources, {"row": Row()})
    assert plain_read(file.filename)["ids"] == ["a", "b", "c"]
    assert len(file.index) == 3


def test_an_empty_source_list_leaves_the_file_alone(tmp_path):
    path = tmp_path / "e.h5"
    build(path, ["a"], {"row": Row()})
    before = plain_read(path)
    for sources in ([], (), iter([])):
        with pytest.raises(SourceError, match="no sources"):
            build(path, sources, {"row": Row()})
    assert plain_read(path)["ids"] == before["ids"] == ["a"]


def test_sources_no_feature_loads_are_an_error_and_leave_the_file_alone(tmp_path):
    """A typo'd folder, a folder of files no ``__re__`` matches: no id would be written."""
    path = tmp_path / "e.h5"
    build(path, ["ok-1"], {"kind": Kind()})
    (tmp_path / "wavs").mkdir()
    for name in ("a.wav", "b.wav"):
        (tmp_path / "wavs" / name).write_bytes(b"RIFF")
    schema = {"grp": h5m.Group(kind=Kind(), arr=h5m.Array())}
    typo = str(tmp_path / "okz")
    with pytest.raises(SourceError, match=rf"any of the 1 sources {re.escape(repr(typo))}.*"
                       r"grp/kind: \^\(ok.*no file or folder is named"):  # fmt: skip
        build(path, [typo], schema)
    with pytest.raises(SourceError, match=r"any of the 2 sources .*a\.wav', .*b\.wav'"):
        build(path, tmp_path / "wavs", schema, mode="a")
    assert plain_read(path)["ids"] == ["ok-1"]
    assert build(path, [typo, "ok-2"], schema).ids.tolist() == ["ok-2"]  # one matches: built


ODD_IDS = ["with space", "  leading and trailing  ", "é/ü/日本語", "a/b/c", "/rooted", "tab\there"]
ODD_IDS += ["emoji 🎉", "quote ' and \"", "new\nline", "x" * 300]


def test_ids_with_spaces_unicode_and_slashes_round_trip(tmp_path):
    file = build(tmp_path / "o.h5", ODD_IDS, {"row": Row()})
    assert plain_read(file.filename)["ids"] == ODD_IDS
    for position, id in enumerate(ODD_IDS):
        assert file.index[id] == position and id in file
        assert file.row.get(id).tolist() == [[len(id)]]
        assert file.get(id) == {"row": file.row.get(id)}
        assert file.row[file.row.refs[id]].tolist() == [[len(id)]]
    assert file.ids.tolist() == ODD_IDS
    reopened = h5m.TypedFile(file.filename)
    assert reopened.row.get("é/ü/日本語").tolist() == [[len("é/ü/日本語")]]
    assert "with space" in str(reopened._repr_html_()) or "with space" in reopened.ids


UNSTORABLE = {"nul\0inside": "NUL character", "nul-at-end\0": "NUL", "bad\udcff.npy": "UTF-8"}


@pytest.mark.parametrize("id", list(UNSTORABLE))
def test_an_id_the_id_table_cannot_store_is_refused_before_anything_is_written(tmp_path, id):
    """HDF5 strings end at a NUL and hold UTF-8 only (an undecodable file name is neither):
    written anyway, such ids committed empty rows and left a file that no longer opened."""
    path = tmp_path / "u.h5"
    build(path, ["a"], {"row": Row()})
    with pytest.raises(SourceError, match=f"source {re.escape(repr(id))} .*{UNSTORABLE[id]}"):
        build(path, ["b", id, "c"], {"row": Row()}, mode="a")
    file = h5m.TypedFile(path, mode="r+", schema={"row": Row()})
    file.add("d", {"row": np.array([[1]])})
    with pytest.raises(ValueError, match=f"id {re.escape(repr(id))} .*{UNSTORABLE[id]}"):
        file.add(id, {"row": np.array([[2]])})  # the fast path hands it to the checks
    file.add("é", {"row": np.array([[3]])})
    file.close()
    assert plain_read(path)["ids"] == ["a", "d", "é"]
    assert plain_read(path)["row"][1:] == [[[1]], [[3]]]


def test_an_undecodable_file_name_in_a_directory_is_named(tmp_path):
    root = tmp_path / "dir"
    root.mkdir()
    (root / "good.txt").write_text("x")
    fd = os.open(os.path.join(os.fsencode(root), b"bad\xff.txt"), os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    with pytest.raises(SourceError, match=r"bad\\udcff.txt' is not valid UTF-8"):
        expand_sources(root)


UNDECODABLE = os.fsdecode(b"bad-\xff")


class Odd(h5m.Feature):
    def load(self, source):
        if source == "b":
            raise OSError(f"cannot open {UNDECODABLE} \0 at byte 3")
        return np.zeros(1)


def test_an_error_message_holding_a_nul_or_no_utf8_is_recorded_escaped(tmp_path):
    file = build(tmp_path / "m.h5", ["a", "b"], {"odd": Odd(), "row": Row()}, on_error="skip")
    assert [f.message for f in file.errors] == [
        "load() raised OSError: cannot open bad-\\udcff \\0 at byte 3"
    ]
    assert plain_read(file.filename)["ids"] == ["a"]


def test_the_id_table_is_cut_back_when_writing_ids_fails(tmp_path):
    from h5dask import format as fmt

    with h5py.File(tmp_path / "t.h5", "w") as f:
        fmt.init_root(f)
        fmt.append_ids(f, ["a", "b"])
        with pytest.raises(ValueError, match="NULL"):
            fmt.append_ids(f, ["c", "d\0"])
        assert f["__src__/id"].asstr()[()].tolist() == ["a", "b"]


@pytest.mark.parametrize("id", ["with space", "é/ü/日本語", "a/b/c", "emoji 🎉"])
def test_the_cli_shows_odd_ids(tmp_path, id):
    path = tmp_path / "cli.h5"
    build(path, [id, "plain"], {"row": Row()})
    run = subprocess.run(
        [sys.executable, "-m", "h5dask", "show", str(path), "row", id],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert str(len(id)) in run.stdout and "int64" in run.stdout
    info = subprocess.run(
        [sys.executable, "-m", "h5dask", "info", str(path)], capture_output=True, text=True
    )
    assert info.returncode == 0 and id in info.stdout


HOLD = """
import sys, time, h5py
f = h5py.File(sys.argv[1], "r+")
print("holding", flush=True)
time.sleep(60)
"""


def test_a_file_held_by_another_writer_is_a_clear_error(tmp_path):
    path = tmp_path / "held.h5"
    build(path, ["a", "b"], {"row": Row()})
    before = plain_read(path)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"holding\n"
        with pytest.raises(H5DaskError) as info:
            build(path, ["c"], {"row": Row()}, mode="a")
        assert str(path) in str(info.value) and "lock" in str(info.value)
        assert isinstance(info.value.__cause__, OSError)  # h5py's error, chained, not raw
        with pytest.raises(H5DaskError, match="held.h5"):
            h5m.TypedFile(path, mode="r+").add("z", {"row": np.zeros((1, 1), np.int64)}).flush()
        with pytest.raises(H5DaskError, match="another process is writing it"):
            build(path, ["c"], {"row": Row()}, mode="w")  # must not truncate it first
    finally:
        holder.kill()
        holder.wait()
    assert plain_read(path)["ids"] == before["ids"]


FILL = """
import sys, numpy as np
sys.path.insert(0, sys.argv[3])
from test_bad_input import Big, build
build(sys.argv[1], [str(i) for i in range(int(sys.argv[2]))], {"big": Big()})
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_stops_the_build_and_a_resume_elsewhere_finishes_it(tmp_path, small_disk):
    n = 48  # 48 MiB of data for a 24 MiB disk
    full = small_disk / "full.h5"
    run = subprocess.run(
        [sys.executable, "-c", FILL, str(full), str(n), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr  # an exception, not a crash of the interpreter
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("h5dask.errors.DiskFullError") and str(full) in last
    assert "source '" in last and "feature 'big'" in last and "free" in last
    moved = tmp_path / "moved.h5"  # resume on a larger disk
    for name in os.listdir(small_disk):
        shutil.copy(small_disk / name, tmp_path / name.replace("full.h5", "moved.h5"))
    sources = [str(i) for i in range(n)]
    build(moved, sources, {"big": Big()}, mode="a")
    read = plain_read(moved)
    assert read["ids"] == sources
    assert [int(a[0, 0]) for a in read["big"]] == list(range(n))
    assert all((a == int(i)).all() for i, a in zip(sources, read["big"], strict=True))
