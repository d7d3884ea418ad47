"""Damaged files: every read gives the right data or an H5DaskError, never another exception.

A bit-flip fuzz test flips one bit of the metadata of a small h5dask file (every byte but
the stored rows of its datasets), a few hundred times, and reads each file in a forked
child of a fresh interpreter (HDF5 can loop for ever or crash on damaged metadata: the
child is killed after a time bound). Crafted cases cover what a flip finds rarely.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from test_hostile import craft

import h5dask as h5m
from h5dask.cli import main
from h5dask.errors import FileFormatError

FUZZ = r"""
import contextlib, io, json, os, random, sys, time
import h5py, numpy as np
import h5dask as h5m
from h5dask.cli import main

base, n, seed, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
schema = {"x": h5m.Array(), "y": h5m.Group(z=h5m.Array())}
with h5m.TypedFile(base, mode="w", schema=schema) as f:
    for i, id in enumerate(["a", "b", "c"]):
        f.add(id, {"x": np.arange(i + 2.0) + 10 * i, "y": {"z": np.full(i + 1, i, "i4")}})

def read(path):
    f = h5m.TypedFile(path)
    got = {id: [f.x.get(id).tolist(), f.y.z.get(id).tolist()] for id in f.ids.tolist()}
    h5m.display.text_table(f), f.errors
    return got

def stored(path):  # the bytes of rows: data, not metadata (the id table's used rows aside)
    spans = []
    def visit(name, ds):
        if isinstance(ds, h5py.Dataset) and ds.chunks:
            for k in range(ds.id.get_num_chunks()):
                info = ds.id.get_chunk_info(k)
                used = 0 if ds.dtype.kind in "iuf" else ds.shape[0] * ds.dtype.itemsize
                spans.append((info.byte_offset + used, info.byte_offset + info.size))
    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return spans

def child(path, want):
    try:
        got = read(path)
    except h5m.errors.H5DaskError as exc:
        return "error"
    except BaseException as exc:
        return f"other {type(exc).__name__}: {exc}"
    if got != want:
        return f"wrong {got}"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["info", "--timeout", "0", path])
    lines = err.getvalue().strip().splitlines()
    return "ok" if code == 0 or (code == 1 and len(lines) == 1) else f"cli {err.getvalue()}"

def run(path, want, timeout=10.0):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, child(path, want).encode("utf-8", "backslashreplace")[:2000])
        os._exit(0)
    os.close(w)
    start = time.monotonic()
    while not os.waitpid(pid, os.WNOHANG)[0]:
        if time.monotonic() - start > timeout:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(r)
            return "timeout"
        time.sleep(0.002)
    out = os.read(r, 4000).decode()
    os.close(r)
    return out or "crash"

want = read(base)
raw = open(base, "rb").read()
spans = stored(base)
meta = [i for i in range(len(raw)) if not any(a <= i < b for a, b in spans)]
rng = random.Random(seed)
outcomes, start = [], time.monotonic()
for k in range(n):
    if k >= 50 and time.monotonic() - start > budget:
        break
    at, bit = rng.choice(meta), rng.randrange(8)
    flipped = bytearray(raw)
    flipped[at] ^= 1 << bit
    path = f"{base}.{k}.h5"
    open(path, "wb").write(flipped)
    outcomes.append([at, bit, run(path, want)])
    os.unlink(path)
print(json.dumps({"metadata bytes": len(meta), "outcomes": outcomes}))
"""


def test_bit_flips_in_metadata_give_the_right_data_or_an_h5dask_error(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", FUZZ, str(tmp_path / "base.h5"), "300", "1", "20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    outcomes = report["outcomes"]
    assert len(outcomes) >= 50 and report["metadata bytes"] > 1000
    kinds = {kind.split()[0] for *_, kind in outcomes}
    bad = [o for o in outcomes if o[2].split()[0] in ("other", "wrong", "cli")]
    assert bad == [], bad  # never another exception, wrong values, or a CLI traceback
    assert "error" in kinds and "ok" in kinds  # the flips did damage, and some were harmless


# -- crafted damage ---------------------------------------------------------------------------


def _cli(*argv: str) -> tuple[str, str, int]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return out.getvalue(), err.getvalue(), code


def _bad_name(f):
    f.create_group(b"caf\xe9")  # a link name that is not UTF-8


def _bad_ids(f):
    del f["__src__/id"]
    f.create_dataset("__src__/id", data=np.array([b"a", b"\xff\xfe", b"c"], dtype="S2"))


def _three_byte_ints(f):
    del f["x/values"]
    t = h5py.h5t.STD_I32LE.copy()
    t.set_size(3)
    space = h5py.h5s.create_simple((10,))
    h5py.h5d.create(f["x"].id, b"values", t, space)


def _huge_ids(f):
    del f["__src__/id"]
    f.create_dataset("__src__/id", shape=(2**40,), dtype=h5py.string_dtype(), chunks=(1024,))


def _missing_chunk(f):
    del f["x/values"]
    f.create_dataset("x/values", shape=(10,), dtype="f8", chunks=(4,))
    f["x/values"][:4] = np.arange(4.0)  # chunks 1 and 2 never written: fill values


DAMAGED = {
    "link name not UTF-8": (_bad_name, "is not UTF-8"),
    "ids not UTF-8": (_bad_ids, "UnicodeDecodeError"),
    "3-byte integers": (_three_byte_ints, "'/x/values': its HDF5 type"),
    "2**40 ids": (_huge_ids, "claims 1099511627776 ids"),
    "chunks missing from the index": (_missing_chunk, "1 of its 3 chunks"),
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_tables_and_names_are_one_format_error(tmp_path, case):
    edit, words = DAMAGED[case]
    path = craft(tmp_path / "bad.h5", edit=edit)
    with pytest.raises(FileFormatError, match=words) as raised:
        file = h5m.TypedFile(path)
        file.x.get("c"), file.info()
    assert str(path) in str(raised.value)
    out, err, code = _cli("info", str(path))
    assert code == 1 and len(err.strip().splitlines()) == 1 and str(path) in err, err


def test_a_values_group_of_a_feature_with_no_ref_left_is_refused(tmp_path):
    path = craft(tmp_path / "orphan.h5", refs=[[-1, -1]] * 3)
    with pytest.raises(FileFormatError, match="values holds 10 rows but no id has any"):
        h5m.TypedFile(path).x.get("a")


# -- time bounds ---------------------------------------------------------------------------------


def test_a_read_that_hangs_in_hdf5_is_stopped_with_one_line(tmp_path):
    """A FIFO nobody writes: HDF5's open blocks in C, where no signal reaches Python."""
    fifo = tmp_path / "hangs.h5"
    os.mkfifo(fifo)
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "h5dask", "info", "--timeout", "1", str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    code, err = run.returncode, run.stderr
    assert code == 1 and time.monotonic() - start < 30
    assert err.count("\n") == 1 and "took longer than 1 s and was stopped" in err, err
    assert str(fifo) in err and "--timeout" in err


def test_the_cli_still_prints_through_its_child(tmp_path):
    path = craft(tmp_path / "ok.h5")
    command = [sys.executable, "-m", "h5dask", "ls", str(path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("x  feature  (10,)  float64  3/3 ids")
    assert run.stderr == ""
    out, err, code = _cli("show", "--timeout", "0", str(path), "x", "c")  # in this process
    assert code == 0 and "shape  (5,)" in out


def test_deep_and_wide_trees(tmp_path):
    def wide(f):
        for i in range(50):
            group = f.create_group(f"g{i}")
            for j in range(40):
                group.create_group(f"h{j}")
        f["g0"].attrs["note"] = "kept"

    path = craft(tmp_path / "wide.h5", edit=wide)
    out, err, code = _cli("ls", "-r", str(path))
    assert code == 0 and len(out.splitlines()) == 1 + 50 + 50 * 40, err
    lines = [line.split() for line in out.splitlines()]
    assert ["g0/", "group", "40", "members"] in lines and [
        "g0/h0/",
        "group",
        "0",
        "members",
    ] in lines
    out, err, code = _cli("info", str(path))
    assert code == 0 and "attrs of g0: note='kept'" in out

    def deep(f):
        f.create_group("/".join(["d"] * 2100))

    path = craft(tmp_path / "deep.h5", edit=deep)
    out, err, code = _cli("info", str(path))
    assert code == 1 and "groups nest deeper than 2048 levels" in err and str(path) in err
