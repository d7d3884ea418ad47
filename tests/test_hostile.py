"""Hostile files: crafted with plain h5py, read by h5dask in a subprocess each.

Every read path (open, info, get, items, refs, to_dask, to_bag, serve, the CLI) must give
a :class:`~h5dask.errors.FileFormatError` naming the file, the feature and the problem, or
read what the file really holds; never run code, crash the interpreter, read outside a
dataset or open another file.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

import h5dask
import h5dask as h5m
from h5dask.display import text_table

PACKAGE = Path(h5dask.__file__).parent
IDS = ["a", "b", "c"]
GOOD_REFS = [[0, 3], [3, 5], [5, 10]]

# -- crafting -------------------------------------------------------------------------------


def craft(path: Path, refs=GOOD_REFS, ids=IDS, version=1, edit=None) -> Path:
    """A small h5dask file: ids a, b, c and feature ``x`` (10 float rows), then ``edit(f)``."""
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["format"] = "h5dask"
        f.attrs["format_version"] = version
        if ids is not None:
            f.create_dataset(
                "__src__/id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype()
            )
        group = f.create_group("x")
        group.create_dataset("values", data=np.arange(10.0))
        group.create_dataset("refs", data=np.asarray(refs))
        if edit is not None:
            edit(f)
    return path


def _replace(f, path, **kwargs):
    del f[path]
    f.create_dataset(path, **kwargs)


def _attrs(**attrs):
    def edit(f):
        for key, value in attrs.items():
            f["x"].attrs[key] = value

    return edit


def _deep(depth):
    def edit(f):
        f.create_group("/".join(["d"] * depth))

    return edit


def _external(f):
    del f["x/values"]
    f["x/values"] = h5py.ExternalLink(str(Path(f.filename).parent / "secret.h5"), "/data")
    f["elsewhere"] = h5py.ExternalLink(str(Path(f.filename).parent / "secret.h5"), "/")


def _soft_into_external(f):
    f["ext"] = h5py.ExternalLink(str(Path(f.filename).parent / "secret.h5"), "/")
    del f["x/values"]
    f["x/values"] = h5py.SoftLink("/ext/data")


def _loops(f):
    f["g/h"] = np.zeros(1)
    f["g/loop"] = f["g"]  # a hard link to its own parent
    f["g/soft"] = h5py.SoftLink("/g")
    f["dangling"] = h5py.SoftLink("/nowhere")


def _values_group(f):
    del f["x/values"]
    f.create_group("x/values")


def _object_refs(f):
    _replace(f, "x/values", data=[f["x"].ref] * 10, dtype=h5py.ref_dtype)
    f["x"].attrs["ref"] = f["x/refs"].ref


PAYLOAD = "PWNED"  # the name of the file the pickle below would create


class _Exploit:
    """Unpickling it creates ``target``: the proof that something unpickled file content."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _pickle_payload(target: Path) -> bytes:
    return pickle.dumps(_Exploit(target))


# case -> (craft kwargs, what each read must say: None where the file reads fine)
REF_CASES = {
    "past the end": dict(refs=[[0, 3], [3, 5], [5, 12]]),
    "negative start": dict(refs=[[0, 3], [-5, 5], [5, 10]]),
    "negative stop": dict(refs=[[0, 3], [3, -2], [5, 10]]),
    "half absent": dict(refs=[[0, 3], [-1, 5], [5, 10]]),
    "start after stop": dict(refs=[[0, 3], [5, 3], [5, 10]]),
    "overlap": dict(refs=[[0, 5], [3, 8], [8, 10]]),
    "overlap out of order": dict(refs=[[6, 10], [0, 3], [2, 6]]),
    "float": dict(refs=np.array(GOOD_REFS, dtype=float)),
    "strings": dict(refs=np.array(GOOD_REFS).astype("S2")),
    "three columns": dict(refs=np.zeros((3, 3), dtype=np.int64)),
    "one-dimensional": dict(refs=np.zeros(3, dtype=np.int64)),
    "shorter than ids": dict(refs=[[0, 3]]),
    "values a scalar": dict(edit=lambda f: _replace(f, "x/values", data=1.0)),
}
REF_WORDS = {
    "past the end": "row 2 is [5, 12)",
    "negative start": "row 1 is [-5, 5)",
    "negative stop": "row 1 is [3, -2)",
    "half absent": "row 1 is [-1, 5)",
    "start after stop": "row 1 is [5, 3)",
    "overlap": "rows 0 [0, 5) and 1 [3, 8) overlap",
    "overlap out of order": "rows 1 [0, 3) and 2 [2, 6) overlap",
    "float": "dtype float64",
    "strings": "dtype |S2",
    "three columns": "shape (3, 3)",
    "one-dimensional": "shape (3,)",
    "shorter than ids": "1 rows for 3 ids",
    "values a scalar": "scalar",
}
ROOT_CASES = {
    "future version": (dict(version=2), "format_version 2 is newer"),
    "version not an integer": (dict(version="1"), "format_version is '1'"),
    "no id table": (dict(ids=None), "no id table"),
    "ids are integers": (
        dict(edit=lambda f: _replace(f, "__src__/id", data=[1, 2, 3])),
        "dtype int64, not 1-D strings",
    ),
    "ids are 2-D": (
        dict(
            edit=lambda f: _replace(f, "__src__/id", data=np.array([["a", "b", "c"]], dtype="S1"))
        ),
        "shape (1, 3)",
    ),
    "id table a group": (
        dict(edit=lambda f: (f.__delitem__("__src__/id"), f.create_group("__src__/id"))),
        "not a dataset",
    ),
}
ATTR_CASES = {
    "garbage json": (dict(edit=_attrs(bad="{not json", __json__=["bad"])), "'bad'"),
    "json not a list": (dict(edit=_attrs(__json__=5)), "is 5, not a list"),
    "json nesting bomb": (
        dict(edit=_attrs(deep="[" * 100_000 + "]" * 100_000, __json__=["deep"])),
        "'deep'",
    ),
}

# -- the probe: one subprocess per file -----------------------------------------------------

PROBE = r"""
import contextlib, io, json, sys
import numpy as np
import h5dask as h5m
from h5dask.cli import main

path, serve = sys.argv[1], sys.argv[2] == "1"

def ops():
    f = lambda: h5m.TypedFile(path)
    yield "open", lambda: f()
    yield "info", lambda: f().info()
    yield "get", lambda: f().x.get("c")
    yield "get by position", lambda: f().x.get(1)
    yield "group get", lambda: f().get("c")
    yield "item by ref", lambda: f().x[f().x.refs[2]]
    yield "refs", lambda: f().x.refs.array
    yield "ids", lambda: f().x.ids
    yield "slice", lambda: f().x[0:4]
    yield "to_dask", lambda: f().x.to_dask("c").compute(scheduler="sync")
    yield "to_bag", lambda: f().x.to_bag().compute(scheduler="sync")
    yield "attrs", lambda: f().x.attrs
    if serve:
        batch = dict(x=h5m.Input(key="x", getter=h5m.GetId()))
        yield "serve", lambda: [b["x"] for b in f().serve(batch, batch_size=1, num_workers=0)]
    def cli():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["info", path])
        if rc:
            raise RuntimeError(f"exit {rc}: {err.getvalue()}")
    yield "cli info", cli

out = {}
for name, op in ops():
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            value = op()
        out[name] = ["ok", repr(value)[:300]]
    except Exception as exc:
        out[name] = [type(exc).__name__, str(exc), isinstance(exc, h5m.errors.FileFormatError)]
print(json.dumps(out))
"""


def probe(path: Path, serve: bool = False) -> dict[str, list]:
    """Run every read of ``path`` in a fresh interpreter; each op's outcome by name."""
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), "1" if serve else "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=path.parent,
    )
    assert run.returncode == 0, f"{path.name}: exit {run.returncode}\n{run.stderr[-2000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def probe_all(paths: dict[str, Path], serve: bool = False) -> dict[str, dict[str, list]]:
    with ThreadPoolExecutor(3) as pool:
        results = pool.map(lambda p: probe(p, serve), paths.values())
        return dict(zip(paths, results, strict=True))


def assert_format_error(outcome: list, filename: Path, *words: str) -> None:
    assert outcome[0] in ("FileFormatError", "RuntimeError"), outcome
    message = outcome[1]
    assert str(filename) in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.fixture
def secret(tmp_path):
    """The file external links point to: h5dask must never read it."""
    with h5py.File(tmp_path / "secret.h5", "w") as f:
        f["data"] = np.full(10, 666.0)
        f.attrs["secret"] = 666
    return tmp_path / "secret.h5"


# -- ref tables -----------------------------------------------------------------------------

READS_REFS = ["info", "get", "get by position", "group get", "refs", "ids", "to_dask"]
READS_REFS += ["to_bag", "serve", "cli info"]
SERVED = ["past the end", "negative start", "overlap", "float", "shorter than ids"]


def test_bad_ref_tables_are_format_errors_on_every_read_path(tmp_path):
    paths = {
        name: craft(tmp_path / f"{i}.h5", **kw) for i, (name, kw) in enumerate(REF_CASES.items())
    }
    results = probe_all({k: v for k, v in paths.items() if k not in SERVED})
    results.update(probe_all({k: paths[k] for k in SERVED}, serve=True))  # torch: slower
    for name, outcome in results.items():
        assert outcome["open"][0] == "ok", (name, outcome["open"])  # tables load on first use
        for op in READS_REFS if name in SERVED else set(READS_REFS) - {"serve"}:
            assert_format_error(outcome[op], paths[name], "'x'", REF_WORDS[name])
        # the concatenation itself is fine where values is a dataset: any h5py item reads it
        if name != "values a scalar":
            assert outcome["slice"] == ["ok", "array([0., 1., 2., 3.])"], name


def test_a_ref_past_the_end_never_returns_a_short_array(tmp_path):
    from h5dask import TypedFile
    from h5dask.errors import FileFormatError

    path = craft(tmp_path / "end.h5", refs=[[0, 3], [3, 5], [5, 11]])
    file = TypedFile(path)
    with pytest.raises(FileFormatError, match=r"row 2 is \[5, 11\)"):
        file.x.get("c")
    with pytest.raises(FileFormatError):  # not cached as valid after a failure
        file.x.get("a")


def test_refs_longer_than_ids_are_an_uncommitted_tail(tmp_path):
    path = craft(tmp_path / "long.h5", refs=[*GOOD_REFS, [0, 10], [99, 100]])
    outcome = probe(path)
    assert outcome["get"] == ["ok", "array([5., 6., 7., 8., 9.])"]
    assert outcome["refs"][0] == "ok" and outcome["refs"][1].count("[") == 4  # 3 rows
    assert outcome["cli info"][0] == "ok"


def test_legitimate_tables_still_read(tmp_path):
    """Absent rows, empty regions anywhere, regions out of file order: all valid."""
    from h5dask import TypedFile

    refs = [[5, 10], [-1, -1], [3, 3], [0, 3], [10, 10], [3, 5]]
    path = craft(tmp_path / "ok.h5", refs=refs, ids=list("abcdef"))
    file = TypedFile(path)
    assert [None if r is None else (r.start, r.stop) for r in file.x.refs] == [
        (5, 10),
        None,
        (3, 3),
        (0, 3),
        (10, 10),
        (3, 5),
    ]
    assert file.x.get("b") is None and file.x.get("c").shape == (0,)
    assert file.x.get("f").tolist() == [3.0, 4.0]


# -- the root: version, id table -----------------------------------------------------------


def test_bad_roots_fail_at_open_naming_the_file(tmp_path):
    paths = {
        n: craft(tmp_path / f"{i}.h5", **kw) for i, (n, (kw, _)) in enumerate(ROOT_CASES.items())
    }
    results = probe_all(paths)
    for name, outcome in results.items():
        words = ROOT_CASES[name][1]
        for op, result in outcome.items():
            if op != "slice":  # reading the concatenation needs no id table
                assert_format_error(result, paths[name], words)


def test_duplicate_ids_fail_every_read_by_id(tmp_path):
    path = craft(tmp_path / "dup.h5", ids=["a", "b", "a"])
    outcome = probe(path)
    for op in ("get", "get by position", "group get", "ids", "to_dask"):
        assert_format_error(outcome[op], path, "id 'a' appears more than once in /__src__/id")
    # reads by position stay well defined: the table, an item, a bag of (id, array) in order
    assert outcome["refs"][0] == "ok" and outcome["item by ref"][0] == "ok"
    assert outcome["info"][0] == "ok" and outcome["cli info"][0] == "ok"


def test_a_future_version_is_never_relabelled_by_a_writer(tmp_path):
    from h5dask import TypedFile
    from h5dask.errors import FileFormatError

    path = craft(tmp_path / "v2.h5", version=2)
    for mode in ("r+", "a"):
        with pytest.raises(FileFormatError, match="format_version 2"):
            TypedFile(path, mode=mode)
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 2


def test_foreign_files_without_an_id_table_still_open(tmp_path):
    from h5dask import TypedFile

    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["table"] = np.arange(4)
    assert TypedFile(tmp_path / "plain.h5").table[:].tolist() == [0, 1, 2, 3]


# -- attributes ------------------------------------------------------------------------------


def test_bad_json_attributes_are_format_errors(tmp_path):
    paths = {
        n: craft(tmp_path / f"{i}.h5", **kw) for i, (n, (kw, _)) in enumerate(ATTR_CASES.items())
    }
    results = probe_all(paths)
    for name, outcome in results.items():
        for op in ("attrs", "info", "cli info"):
            assert_format_error(outcome[op], paths[name], ATTR_CASES[name][1], "__json__")
        assert outcome["get"] == ["ok", "array([5., 6., 7., 8., 9.])"]  # data stays readable


def test_odd_attributes_read_as_data_and_never_run_code(tmp_path):
    from h5dask import TypedFile

    target = tmp_path / PAYLOAD
    payload = _pickle_payload(target)
    odd = dict(
        huge="x" * 1_000_000,
        binary=np.void(b"\xff\x00\x80"),
        latin=np.bytes_(b"caf\xe9"),
        pickled=np.void(payload),
        pickled_bytes=np.bytes_(payload),
    )
    path = craft(tmp_path / "attrs.h5", edit=_attrs(**odd))
    outcome = probe(path)
    assert all(result[0] == "ok" for result in outcome.values()), outcome
    attrs = TypedFile(path).x.attrs  # binary stays bytes; nothing is decoded beyond UTF-8
    assert attrs["huge"] == "x" * 1_000_000 and attrs["latin"] == b"caf\xe9"
    assert attrs["binary"] == b"\xff\x00\x80" and attrs["pickled"] == payload
    assert attrs["pickled_bytes"] == payload
    text = pickle.dumps(_Exploit(target), protocol=0).decode("ascii")  # no NUL: fits a str
    as_json = _attrs(pickled_json=text, __json__=["pickled_json"])
    outcome = probe(craft(tmp_path / "json.h5", edit=as_json))
    assert outcome["attrs"][0] == "FileFormatError" and "pickled_json" in outcome["attrs"][1]
    assert not target.exists()  # nothing unpickled the payload


# the only unpickling in the package, and of what: never anything read from a file
NOT_FILE_CONTENT = [
    ("engine.py", "pickle.loads(pickle.dumps(error))"),  # can a worker's exception travel?
    ("engine.py", "cloudpickle.loads(payload)"),  # a task this process pickled for a worker
    ("compat.py", "cloudpickle.loads(payload)"),  # for_each's function, pickled by this process
]


def test_nothing_in_the_package_unpickles_or_evaluates_file_content():
    pattern = re.compile(r"\b(pickle\.loads?|cloudpickle\.loads?|marshal\.loads|eval|exec)\(")
    hits = [
        (str(path.relative_to(PACKAGE)), line.strip())
        for path in PACKAGE.rglob("*.py")
        for line in path.read_text().splitlines()
        if pattern.search(line)
    ]
    unknown = [
        hit for hit in hits if not any(hit[0] == f and s in hit[1] for f, s in NOT_FILE_CONTENT)
    ]
    assert unknown == []
    assert len(list(PACKAGE.rglob("*.py"))) > 10  # the walk saw the package


# -- structure: links, loops, depth, odd datasets --------------------------------------------


def test_external_and_soft_links_are_never_followed(tmp_path, secret):
    for name, edit in [("external", _external), ("soft", _soft_into_external)]:
        path = craft(tmp_path / f"{name}.h5", edit=edit)
        outcome = probe(path)
        text = json.dumps(outcome)
        assert "666" not in text, name  # the other file's data never came back
        for op in ("open", "get", "cli info"):  # a link for values: half a feature, refused
            assert_format_error(outcome[op], path, "group 'x' holds one of 'values' and 'refs'")
    from h5dask import TypedFile

    other = str(secret)
    path = craft(
        tmp_path / "root.h5",
        edit=lambda f: f.__setitem__("elsewhere", h5py.ExternalLink(other, "/")),
    )
    file = TypedFile(path)
    assert "elsewhere" not in file.keys() and file.x.get("c").tolist() == [5.0, 6, 7, 8, 9]
    with h5py.File(secret, "a"):  # a reader holding the other file open changes nothing
        assert TypedFile(path).keys() == ["x"]
    declared = TypedFile(path, schema={"elsewhere": h5m.Array()})
    assert declared.elsewhere.attrs == {} and declared.elsewhere.get("a") is None
    assert "666" not in text_table(declared, path="elsewhere")


def test_loops_dangling_links_and_deep_groups_read_in_finite_time(tmp_path):
    paths = {
        "loops": craft(tmp_path / "loops.h5", edit=_loops),
        "deep": craft(tmp_path / "deep.h5", edit=_deep(1100)),  # past the recursion limit
    }
    results = probe_all(paths)
    for name, outcome in results.items():
        assert outcome["get"] == ["ok", "array([5., 6., 7., 8., 9.])"], name
        assert outcome["cli info"][0] == "ok", (name, outcome["cli info"])
    from h5dask import TypedFile

    loops = TypedFile(paths["loops"])
    assert sorted(loops.features) == ["g/h", "x"]


def test_values_that_are_not_datasets_and_object_references(tmp_path):
    path = craft(tmp_path / "group.h5", edit=_values_group)
    outcome = probe(path)
    for op in ("open", "get", "cli info"):  # half a feature: a damaged group, not data
        assert_format_error(outcome[op], path, "group 'x' holds one of 'values' and 'refs'")
    outcome = probe(craft(tmp_path / "objrefs.h5", edit=_object_refs))
    assert outcome["cli info"][0] == "ok"
    assert (
        outcome["get"][0] == "ok" and "object reference" in outcome["get"][1]
    )  # never dereferenced
