"""The ``h5dask`` command line, run as ``python -m h5dask`` on real files; html reprs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import h5dask as h5m

MODULE = """
import numpy as np
import h5dask as h5m


class Squares(h5m.Feature):
    __re__ = r"^\\d+$"
    __ds_kwargs__ = dict(compression="gzip")

    def load(self, source):
        if source == "3":
            raise ValueError("three is bad")
        return np.arange(int(source), dtype="float32") ** 2

    def plot(self, data):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot(np.asarray(data))
        return fig


class Name(h5m.Feature):
    @property
    def attrs(self):
        return {"lang": "en", "sizes": [1, 2]}

    def load(self, source):
        return f"src-{source}"


class Exp(h5m.TypedFile):
    data = h5m.Group(sq=Squares(), kind=Name())
    logs = h5m.Group(loss=h5m.Array())


def helper():
    return 1
"""


def h5dask(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m h5dask ARGS`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "h5dask", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )


def assert_user_error(result: subprocess.CompletedProcess, *words: str, code: int = 1) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    for word in words:
        assert word in result.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli")
    (path / "typed.py").write_text(MODULE)
    return path


@pytest.fixture(scope="module")
def module(folder) -> ModuleType:
    """The module of the typed file's class, imported in this process."""
    spec = importlib.util.spec_from_file_location("cli_typed", folder / "typed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(folder) -> tuple[Path, subprocess.CompletedProcess]:
    """``h5dask build typed.py:Exp`` (sync scheduler, failures skipped), run from elsewhere."""
    out = folder / "exp.h5"
    result = h5dask(
        "build", str(folder / "typed.py") + ":Exp", str(out), "1", "2", "3", "5", "x",
        "--scheduler", "sync", "--on-error", "skip",
        cwd=folder.parent,
    )  # fmt: skip
    with h5m.TypedFile(out, mode="r+") as file:
        file.logs.add("train", {"loss": np.linspace(1.0, 0.1, 10)})
    return out, result


# -- global options ------------------------------------------------------------------------------


def test_version_and_help_of_each_command():
    assert h5dask("--version").stdout.strip() == f"h5dask {h5m.__version__}"
    top = h5dask("--help")
    assert top.returncode == 0
    for command in ("info", "ls", "show", "build"):
        assert command in top.stdout
    for command, option in (("info", "--ids"), ("ls", "--recursive"), ("show", "ID"),
                            ("build", "--on-error")):  # fmt: skip
        result = h5dask(command, "--help")
        assert result.returncode == 0
        assert f"usage: h5dask {command}" in result.stdout and option in result.stdout


def test_usage_errors_exit_2():
    assert_user_error(h5dask(), "usage: h5dask", "COMMAND", code=2)
    assert_user_error(h5dask("info"), "usage: h5dask info", "FILE", code=2)
    assert_user_error(h5dask("info", "x.h5", "--ids", "0"), "positive integer", code=2)


# -- build ---------------------------------------------------------------------------------------


def test_build_prints_summary_and_skipped_failures(built):
    out, result = built
    assert result.returncode == 0, result.stderr
    assert f"wrote {str(out)!r}: 4 ids, 2 features" in result.stdout
    assert "failures recorded: 1" in result.stdout
    assert "source '3', 'data/sq': load() raised ValueError: three is bad" in result.stderr
    assert "100%" in result.stderr  # the progress bar
    file = h5m.TypedFile(out)
    assert file.ids.tolist()[:4] == ["1", "2", "5", "x"]
    assert [e.source for e in file.errors] == ["3"]


def test_build_from_importable_module_resumes_with_mode_a(folder):
    out = folder / "resumed.h5"
    first = h5dask("build", "typed:Exp", str(out), "1", "2", "--scheduler", "sync", cwd=folder)
    assert first.returncode == 0, first.stderr
    again = h5dask(
        "build", "typed:Exp", str(out), "2", "4", "--mode", "a", "--scheduler", "sync",
        "--no-progress", cwd=folder,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "3 ids" in again.stdout and "%" not in again.stderr
    assert h5m.TypedFile(out).ids.tolist() == ["1", "2", "4"]


def test_build_on_worker_processes_of_a_class_from_a_file(folder, tmp_path):
    out = tmp_path / "workers.h5"
    result = h5dask(
        "build", str(folder / "typed.py") + ":Exp", str(out), "1", "2", "4", "--workers", "2",
        "--no-progress", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert h5m.TypedFile(out).data.sq.get("4").tolist() == [0, 1, 4, 9]


def test_build_failure_names_source_feature_and_cause(folder, tmp_path):
    result = h5dask(
        "build", str(folder / "typed.py") + ":Exp", str(tmp_path / "f.h5"), "1", "3",
        "--scheduler", "sync", "--no-progress",
    )  # fmt: skip
    assert_user_error(result, "source '3'", "'data/sq'", "ValueError: three is bad", "--mode a")


@pytest.mark.parametrize(
    ("spec", "words", "code"),
    [
        ("no_such_module_xyz:Exp", ["no module named 'no_such_module_xyz'"], 1),
        ("typed.py:Nope", ["has no attribute 'Nope'", "TypedFile classes there: Exp"], 1),
        ("typed.py:helper", ["'typed.py:helper' is a function, not a TypedFile subclass"], 1),
        ("missing.py:Exp", ["no such file: 'missing.py'"], 1),
        ("typed", ["is not module:Class"], 2),
    ],
)
def test_build_bad_module_class(folder, spec, words, code):
    result = h5dask("build", spec, "out.h5", "1", "--scheduler", "sync", cwd=folder)
    assert_user_error(result, *words, code=code)
    assert not (folder / "out.h5").exists()


def test_build_of_sources_no_feature_loads_is_one_line(tmp_path):
    """A typo'd folder is kept as a plain source that no feature's __re__ matches: the build
    would write 0 ids and exit 0; it is an error naming the source, and OUT is not written."""
    (tmp_path / "png.py").write_text(
        "import numpy as np, h5dask as h5m\n"
        "class Png(h5m.Feature):\n"
        "    __re__ = r'\\.png$'\n"
        "    def load(self, source):\n"
        "        return np.zeros(3)\n"
        "class Imgs(h5m.TypedFile):\n"
        "    img = Png()\n"
    )
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.wav").write_bytes(b"RIFF")
    for source, words in [("imgz", ["'imgz'", "no file or folder"]), ("imgs", ["a.wav"])]:
        result = h5dask("build", "png.py:Imgs", "out.h5", source, "--scheduler", "sync",
                        cwd=tmp_path)  # fmt: skip
        assert_user_error(result, "no feature loads any of the 1 sources", r"img: \.png$", *words)
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "out.h5").exists()


def test_build_error_in_the_users_module_is_one_line(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom at import')\n")
    result = h5dask("build", "broken.py:Exp", "out.h5", "1", cwd=tmp_path)
    assert_user_error(result, "importing 'broken.py' failed: RuntimeError: boom at import")
    shown = h5dask("build", "broken.py:Exp", "out.h5", "1", "--traceback", cwd=tmp_path)
    assert shown.returncode == 1 and "Traceback" in shown.stderr


# -- info, ls, show ------------------------------------------------------------------------------


def test_info_prints_the_table(built):
    out, _ = built
    result = h5dask("info", str(out))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"<TypedFile {str(out)!r}: 5 ids>"
    assert lines[1].split() == ["feature", "dtype", "rows", "ids", "with", "data", "stored",
                                "1", "2", "5", "x", "train"]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert rows["data/sq"][:4] == ["data/sq", "float32", "8", "3"]
    assert "(gzip)" in rows["data/sq"] and rows["data/sq"][-5:] == ["(1,)", "(2,)", "(5,)",
                                                                     "None", "None"]  # fmt: skip
    assert rows["logs/loss"][-5:] == ["None"] * 4 + ["(10,)"]
    assert "attrs of data/kind: lang='en', sizes=[1, 2]" in lines
    assert "failures recorded by create(on_error='skip'): 1" in lines


def test_info_cuts_ids_and_matches_file_info(built, capsys):
    out, _ = built
    result = h5dask("info", str(out), "--ids", "2")
    assert "... 3 more ids" in result.stdout.splitlines()[1]
    h5m.TypedFile(out).info()
    printed = capsys.readouterr().out
    assert h5dask("info", str(out)).stdout.startswith(printed)


def test_ls_lists_groups_and_features(built):
    out, _ = built
    top = h5dask("ls", str(out)).stdout.splitlines()
    assert [line.split() for line in top] == [["data/", "group", "2", "members"],
                                              ["logs/", "group", "1", "member"]]  # fmt: skip
    listed = h5dask("ls", str(out), "data").stdout.splitlines()
    data = {line.split()[0]: line.split() for line in listed}
    assert data["data/kind"][:5] == ["data/kind", "feature", "(4,)", "object", "4/5"]
    assert data["data/sq"][:5] == ["data/sq", "feature", "(8,)", "float32", "3/5"]
    assert "(gzip)" in data["data/sq"]
    everything = h5dask("ls", "-r", str(out)).stdout
    assert "logs/loss" in everything and "data/sq" in everything
    assert h5dask("ls", str(out), "/logs/loss").stdout.split()[:3] == ["logs/loss", "feature",
                                                                       "(10,)"]  # fmt: skip


def test_show_summarises_one_source(built):
    out, _ = built
    numbers = h5dask("show", str(out), "data/sq", "5").stdout.splitlines()
    assert numbers[:4] == [
        f"id '5' in {str(out)!r}",
        "data/sq:",
        "  shape  (5,)",
        "  dtype  float32",
    ]
    assert numbers[4:] == ["  min    0", "  max    16", "  mean   6", "  [ 0.  1.  4.  9. 16.]"]
    strings = h5dask("show", str(out), "data/kind", "x").stdout
    assert "dtype  str" in strings and "['src-x']" in strings and "min" not in strings
    group = h5dask("show", str(out), "data", "2").stdout
    assert "data/kind:" in group and "data/sq:" in group and "[0. 1.]" in group
    by_position = h5dask("show", str(out), "logs/loss", "-1").stdout
    assert "id 'train'" in by_position and "max    1" in by_position
    absent = h5dask("show", str(out), "data/sq", "x")
    assert absent.returncode == 0 and "None (no data for this id)" in absent.stdout


def test_show_unknown_feature_and_id(built):
    out, _ = built
    assert_user_error(
        h5dask("show", str(out), "data/nope", "1"),
        "no group or feature 'data/nope'",
        "data/sq",
    )
    assert_user_error(h5dask("show", str(out), "data/sq", "zz"), "unknown id 'zz'", "5 ids")
    assert_user_error(h5dask("ls", str(out), "nope"), "no group or feature 'nope'")


@pytest.mark.parametrize("command", [["info"], ["ls"], ["show", "data/sq", "1"]])
def test_missing_and_non_hdf5_files(tmp_path, command):
    name, *rest = command
    missing = h5dask(name, str(tmp_path / "missing.h5"), *rest)
    assert_user_error(missing, f"h5dask {name}: error: no such file")
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    assert_user_error(h5dask(name, str(text), *rest), "is not an HDF5 file")


# -- Jupyter -------------------------------------------------------------------------------------


def test_html_repr_of_file_group_and_feature(built, module):
    out, _ = built
    file = module.Exp(out)
    page = file._repr_html_()
    assert page.count("<table>") == 1 and "&lt;Exp" in page
    for header in ("<th>1</th>", "<th>x</th>", "<th>train</th>", "<th>ids with data</th>"):
        assert header in page
    assert "<td>data/sq</td>" in page and "(gzip)" in page and "<td>logs/loss</td>" in page
    assert "<summary>attrs</summary>" in page and "lang=&#x27;en&#x27;" in page
    group = file.data._repr_html_()
    assert "Group /data" in group and "<td>data/sq</td>" in group
    assert "logs/loss" not in group
    feature = file.data.sq._repr_html_()
    assert "Feature /data/sq" in feature and "<td>data/kind</td>" not in feature
    assert "<td>(5,)</td>" in feature


def test_html_repr_of_many_ids_is_cut_with_counts(tmp_path):
    class Logs(h5m.TypedFile):
        loss = h5m.Array()
        step = h5m.Array()

    with Logs(tmp_path / "many.h5", mode="w") as file:
        for i in range(1000):
            file.add(f"run-{i:04d}", {"loss": np.zeros(i % 3 + 1), "step": np.arange(i % 2)})
    file = Logs(tmp_path / "many.h5")
    page = file._repr_html_()
    assert page.count("<th>run-") == 5 and "<th>run-0005</th>" not in page
    assert "... 995 more ids" in page and "1000 ids" in page
    assert "<td>1000</td>" in page  # every id has a loss
    assert "<td>(3,)</td>" in page and "<td>(0,)</td>" in page  # zero rows is not None
    assert len(page) < 3000


def test_a_features_plot_is_reachable_from_its_proxy(built, module):
    out, _ = built
    file = module.Exp(out)
    data = file.data.sq.get("5")
    figure = file.data.sq.plot(data)
    assert figure.axes[0].lines[0].get_ydata().tolist() == [0, 1, 4, 9, 16]
    with pytest.raises(AttributeError, match="no attribute 'plot'"):
        file.logs.loss.plot(data)
