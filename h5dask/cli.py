"""The ``h5dask`` command line: inspect typed files and build them.

``h5dask info FILE`` prints the 2-D table (features down, ids across),
``h5dask ls FILE [PATH]`` lists groups and features, ``h5dask show FILE
FEATURE ID`` summarises one source's array and ``h5dask build module:Class OUT
SOURCES...`` runs :meth:`TypedFile.create`; ``h5dask convert OLD NEW`` rewrites
a file of h5mapper in h5dask's format. A user mistake (a missing file, a
bad ``module:Class``, an unknown feature or id) is one line on stderr and exit
code 1; a bad command line is exit code 2. ``--traceback`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import select
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.dtypes import StringDType

from . import __version__
from . import format as fmt
from .display import MAX_IDS, _size, text_table
from .errors import H5DaskError, SourceFeatureError
from .proxy import GroupProxy
from .typed_file import TypedFile

__all__ = ["main", "build_parser", "load_class", "CLIError"]

MAX_FAILURES = 20
TIMEOUT = 120.0  # seconds a command may read a file (--timeout)
RESUME = "the sources before it are committed: --mode a resumes, --on-error skip records failures"
PREVIEW = dict(threshold=24, edgeitems=3, precision=4, max_line_width=100)


class CLIError(Exception):
    """A user mistake, reported as one line on stderr with exit code 1."""


# -- entry point ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code.

    Examples
    --------
    >>> main(["--version"])  # doctest: +SKIP
    h5dask 0.1.0
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "timeout", 0) and not args.traceback and threading.active_count() == 1:
        return _with_timeout(args)  # (a fork of a process with threads may deadlock)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command in this process; return the exit code."""
    try:
        args.run(args)
    except KeyboardInterrupt:
        hint = f"\n{RESUME}" if args.command == "build" else ""
        print(f"h5dask {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `h5dask ls big.h5 | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 1
    except (CLIError, H5DaskError, OSError) as exc:
        if args.traceback:
            raise
        print(f"h5dask {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _with_timeout(args: argparse.Namespace) -> int:
    """Run a command that reads a file in a forked child, stopped after ``--timeout`` seconds.

    Only from a process of one thread (the command line itself): elsewhere the
    command runs in the caller's process, without a time bound.

    A damaged file can make HDF5 itself loop for ever (a flipped bit in the heap of
    the id table did, plain h5py too), and no signal interrupts HDF5's C code:
    a child process can be killed. Its output comes back through a pipe and is
    printed here, once the child ends.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, send what it printed, never return into the caller
        code = 1
        try:
            os.close(read)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = _run(args)
            report = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
            with os.fdopen(write, "w", encoding="utf-8", errors="backslashreplace") as pipe:
                json.dump(report, pipe)
        finally:
            os._exit(code)
    os.close(write)
    try:
        received = _receive(read, args.timeout)
    except KeyboardInterrupt:
        received = b""
        print(f"h5dask {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        os.close(read)
        if not received:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if received is None:
        print(
            f"h5dask {args.command}: error: reading {args.file!r} took longer than "
            f"{args.timeout:g} s and was stopped (a damaged file can make HDF5 loop for ever); "
            "--timeout SECONDS waits longer, 0 without limit",
            file=sys.stderr,
        )
        return 1
    if not received:
        cause = f"signal {-status}" if os.WIFSIGNALED(status) else f"exit {status}"
        print(
            f"h5dask {args.command}: error: the process reading {args.file!r} died "
            f"({cause}): HDF5 crashed on it, a damaged file?",
            file=sys.stderr,
        )
        return 1
    report = json.loads(received)
    try:
        sys.stdout.write(report["out"])
        sys.stdout.flush()
    except BrokenPipeError:  # `h5dask ls big.h5 | head`
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 1
    sys.stderr.write(report["err"])
    return int(report["code"])


def _receive(fd: int, timeout: float) -> bytes | None:
    """All that ``fd`` gives until its end, or None if that takes over ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``h5dask`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="h5dask", description="Inspect and build typed HDF5 files (h5dask format)."
    )
    parser.add_argument("--version", action="version", version=f"h5dask {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--traceback", action="store_true", help="show the full traceback of an error"
    )
    for add in (_add_info, _add_ls, _add_show, _add_build, _add_repair, _add_convert):
        add(commands, common)
    return parser


def _command(commands: Any, common: argparse.ArgumentParser, name: str, help: str) -> Any:
    return commands.add_parser(name, parents=[common], help=help, description=help)


def _open(filename: str, allow_external: bool = False) -> TypedFile:
    return TypedFile(filename, mode="r", allow_external=allow_external)


def _add_file(sub: argparse.ArgumentParser) -> None:
    """The FILE argument of a command that reads one, and ``--allow-external``."""
    sub.add_argument("file", metavar="FILE", help="an HDF5 file")
    sub.add_argument(
        "--allow-external",
        action="store_true",
        help="read datasets whose data HDF5 keeps in other files (external storage, virtual "
        "datasets); by default they are refused and no other file is opened",
    )
    sub.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT,
        metavar="SECONDS",
        help=f"stop reading after SECONDS (default {TIMEOUT:g}; 0: no limit): a damaged file "
        "can make HDF5 loop for ever",
    )


# -- info ---------------------------------------------------------------------------------------


def _add_info(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands,
        common,
        "info",
        "Print the file's table: features down, ids across, each cell the shape of that "
        "source's array or None; with dtypes, row counts, sizes on disk, compression and attrs.",
    )
    _add_file(sub)
    sub.add_argument(
        "--ids", type=_positive, default=MAX_IDS, metavar="N", help="ids shown as columns"
    )
    sub.set_defaults(run=run_info)


def run_info(args: argparse.Namespace) -> None:
    """``h5dask info``: the table, then the failures that ``create`` recorded."""
    file = _open(args.file, args.allow_external)
    print(text_table(file, max_ids=args.ids))
    failures = file.errors
    if failures:
        print(f"failures recorded by create(on_error='skip'): {len(failures)}")
        _print_failures(failures, sys.stdout)


def _print_failures(failures: list[Any], stream: Any) -> None:
    for failure in failures[:MAX_FAILURES]:
        print(f"  source {failure.source!r}, {failure.feature!r}: {failure.message}", file=stream)
    if len(failures) > MAX_FAILURES:
        print(f"  ... {len(failures) - MAX_FAILURES} more", file=stream)


# -- ls -----------------------------------------------------------------------------------------


def _add_ls(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands, common, "ls", "List the groups and features at PATH (default: the top level)."
    )
    _add_file(sub)
    sub.add_argument("path", metavar="PATH", nargs="?", default="", help="a group or feature")
    sub.add_argument("-r", "--recursive", action="store_true", help="list everything below PATH")
    sub.set_defaults(run=run_ls)


def run_ls(args: argparse.Namespace) -> None:
    """``h5dask ls``: one line per group or feature."""
    file = _open(args.file, args.allow_external)
    path = _proxy(file, args.path).path
    layout = file._layout()
    if path in layout and layout[path].kind != "group":
        paths = [path]
    else:
        prefix = path + "/" if path else ""
        below = [p for p in layout if p.startswith(prefix)]
        paths = below if args.recursive else [p for p in below if "/" not in p[len(prefix) :]]
    members = Counter(p.rpartition("/")[0] for p in layout)  # one pass: members by group
    with file._handle.open() as f:
        n = fmt.n_ids(f)
        lines = [_ls_columns(f, p, layout, members[p], n, file.allow_external) for p in paths]
    _print_columns(lines)


def _ls_columns(
    f: h5py.File,
    path: str,
    layout: dict[str, fmt.Node],
    members: int,
    n: int,
    allow_external: bool,
) -> list[str]:
    node = layout[path]
    if node.kind == "group":
        return [path + "/", "group", f"{members} member" + "s" * (members != 1)]
    count = "-"
    if node.other_files and not allow_external:  # described, never read
        return [path, node.kind, str(node.shape), str(node.dtype), "in other files, not read: "
                + ", ".join(node.other_files)]  # fmt: skip
    if node.kind == "feature":
        refs = fmt.read_refs(f[path], n, allow_external)
        count = f"{int((refs[:, 0] >= 0).sum())}/{n} ids"
    stored = _size(node.nbytes_stored) + (f" ({node.compression})" if node.compression else "")
    return [path, node.kind, str(node.shape), str(node.dtype), count, stored]


def _print_columns(lines: list[list[str]]) -> None:
    width = max((len(line) for line in lines), default=0)
    widths = [max((len(x[i]) for x in lines if i < len(x)), default=0) for i in range(width)]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip())


# -- show ---------------------------------------------------------------------------------------


def _add_show(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands,
        common,
        "show",
        "Summarise one source's data in a feature (or every feature of a group): shape, dtype, "
        "min/max/mean of numbers and a preview. ID is an id, or the integer position of one "
        "when no id is spelled so.",
    )
    _add_file(sub)
    sub.add_argument("feature", metavar="FEATURE", help='a feature or group, e.g. "data/images"')
    sub.add_argument("id", metavar="ID", help="a source id, or its position")
    sub.set_defaults(run=run_show)


def run_show(args: argparse.Namespace) -> None:
    """``h5dask show``: the summary of each array that ``id`` has under ``feature``."""
    file = _open(args.file, args.allow_external)
    proxy = _proxy(file, args.feature)
    id = _resolve_id(file, args.id)
    print(f"id {id!r} in {file.filename!r}")
    data = proxy.get(id)
    leaves = _flatten(data, proxy.path) if isinstance(proxy, GroupProxy) else {proxy.path: data}
    for path, array in leaves.items():
        print(f"{path}:")
        for line in summarize(array):
            print("  " + line)
    if not leaves:
        print(f"{proxy.path or '/'}: None (no data for this id)")


def _resolve_id(file: TypedFile, text: str) -> str:
    if text in file.index:
        return text
    ids = file.ids
    try:
        position = int(text)
    except ValueError:
        position = None
    if position is not None and -len(ids) <= position < len(ids):
        return str(ids[position])
    first = ", ".join(repr(i) for i in ids[:3].tolist())
    more = ", ..." if len(ids) > 3 else ""
    raise CLIError(f"unknown id {text!r} in {file.filename!r} ({len(ids)} ids: {first}{more})")


def _flatten(data: Any, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        path = f"{prefix}/{name}" if prefix else name
        out.update(_flatten(value, path) if isinstance(value, dict) else {path: value})
    return out


def summarize(data: Any) -> list[str]:
    """Lines describing ``data``: shape, dtype, statistics of numbers, a preview.

    Examples
    --------
    >>> summarize(np.array([1.0, 3.0]))
    ['shape  (2,)', 'dtype  float64', 'min    1', 'max    3', 'mean   2', '[1. 3.]']
    """
    if data is None:
        return ["None (no data for this id)"]
    array = np.asarray(data)
    strings = array.dtype.kind in "OSUT"
    dtype = "str" if strings else str(array.dtype)
    lines = [f"shape  {array.shape}", f"dtype  {dtype}"]
    if array.dtype.kind in "biuf" and array.size:
        values = array.astype(np.float64)
        for name, stat in (("min", np.nanmin), ("max", np.nanmax), ("mean", np.nanmean)):
            lines.append(f"{name:<6} {_number(stat(values))}")
    if strings:
        array = array.astype(StringDType())
    lines += np.array2string(array, **PREVIEW).splitlines()
    return lines


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else f"{value:.6g}"


# -- build --------------------------------------------------------------------------------------


def _add_build(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands,
        common,
        "build",
        "Build OUT from SOURCES with TypedFile.create of the class CLASS, given as "
        "module:Class (an importable module) or path/to/file.py:Class.",
    )
    sub.add_argument("cls", metavar="CLASS", type=_class_spec, help="module:Class or file.py:Class")
    sub.add_argument("out", metavar="OUT", help="the HDF5 file to write")
    sub.add_argument("sources", metavar="SOURCES", nargs="+", help="paths, dirs, globs or URLs")
    sub.add_argument("--workers", type=_positive, metavar="N", help="worker processes")
    sub.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help='"sync", "threads", "processes" or a dask scheduler address (tcp://host:8786)',
    )
    sub.add_argument(
        "--mode",
        choices=("w", "a", "r+", "w-", "x"),
        default="w",
        help='"w" truncates OUT; "a" adds to it and skips the ids already committed (resume)',
    )
    sub.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help='"skip" records failing sources in the file and goes on',
    )
    sub.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="fail a source whose loads run longer (LoadTimeoutError; see --on-error)",
    )
    sub.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.set_defaults(run=run_build)


def run_build(args: argparse.Namespace) -> None:
    """``h5dask build``: import the class, run ``create``, print a one-line summary."""
    cls = load_class(args.cls)
    start = time.perf_counter()
    file = _create(cls, args)
    seconds = time.perf_counter() - start
    failures = file.errors
    features = len(file._leaf_paths())
    size = os.path.getsize(file.filename) / 2**20
    print(
        f"wrote {file.filename!r}: {len(file.ids)} ids, {features} features, {size:.1f} MiB "
        f"in {seconds:.1f} s; failures recorded: {len(failures)}"
    )
    if failures:
        _print_failures(failures, sys.stderr)


def _create(cls: type[TypedFile], args: argparse.Namespace) -> TypedFile:
    try:
        return cls.create(
            args.out,
            args.sources,
            mode=args.mode,
            n_workers=args.workers,
            scheduler=args.scheduler,
            on_error=args.on_error,
            progress=not args.no_progress,
            timeout=args.timeout,
        )
    except Exception as exc:  # a failing source, user code in hooks, bad arguments: one line
        if args.traceback:
            raise
        known = isinstance(exc, (H5DaskError, OSError))
        message = str(exc) if known else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SourceFeatureError):
            message += f"\n{RESUME}"
        raise CLIError(message) from exc


def _class_spec(text: str) -> str:
    module, sep, name = text.rpartition(":")
    if not sep or not module or not name.replace(".", "").replace("_", "").isalnum():
        raise argparse.ArgumentTypeError(f"{text!r} is not module:Class or path/to/file.py:Class")
    return text


def load_class(spec: str) -> type[TypedFile]:
    """The TypedFile subclass named by ``module:Class`` or ``path/to/file.py:Class``.

    Raises
    ------
    CLIError
        The module cannot be imported, has no such attribute, or it is not a
        :class:`TypedFile` subclass.
    """
    where, _, name = spec.rpartition(":")
    module = _import_file(where) if where.endswith(".py") or os.sep in where else _import(where)
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            found = [k for k, v in vars(module).items() if _is_typed_file(v)]
            hint = f" (TypedFile classes there: {', '.join(found)})" if found else ""
            raise CLIError(f"{where!r} has no attribute {name!r}{hint}")
        obj = getattr(obj, part)
    if not _is_typed_file(obj):
        raise CLIError(f"{spec!r} is a {type(obj).__name__}, not a TypedFile subclass")
    return obj


def _is_typed_file(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, TypedFile) and obj is not TypedFile


def _import(name: str) -> Any:
    _add_to_path(os.getcwd())
    return _guarded(name, lambda: importlib.import_module(name))


def _import_file(where: str) -> Any:
    """Import ``path/to/file.py`` as module ``file``, importable by worker processes too."""
    path = Path(where).resolve()
    if not path.is_file():
        raise CLIError(f"no such file: {where!r}")
    _add_to_path(str(path.parent))
    module = _guarded(where, lambda: importlib.import_module(path.stem))
    if Path(getattr(module, "__file__", "") or "").resolve() != path:
        raise CLIError(f"{where!r} is shadowed by the module {path.stem!r}: rename the file")
    return module


def _add_to_path(folder: str) -> None:
    """Put ``folder`` first on the import path of this process and of the workers it starts."""
    if folder not in sys.path:
        sys.path.insert(0, folder)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if folder not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([folder, *filter(None, paths)])


def _guarded(name: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except ModuleNotFoundError as exc:
        if exc.name == name or name.startswith(f"{exc.name}."):
            raise CLIError(f"no module named {name!r} (from {os.getcwd()!r})") from exc
        raise CLIError(f"importing {name!r} failed: {exc}") from exc
    except Exception as exc:  # any error in the user's module: one line, not a traceback
        raise CLIError(f"importing {name!r} failed: {type(exc).__name__}: {exc}") from exc


# -- shared -------------------------------------------------------------------------------------


def _proxy(file: TypedFile, path: str) -> Any:
    try:
        return file.get_proxy(path)
    except KeyError:
        known = ", ".join(file._leaf_paths()[:10]) or "nothing"
        raise CLIError(
            f"{file.filename!r} has no group or feature {path!r} (features: {known})"
        ) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


# -- repair -------------------------------------------------------------------------------------


def _add_repair(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands,
        common,
        "repair",
        "Undo the unfinished commit of a writer that died (kill -9, a crash): the file is "
        "restored to its last commit; `build --mode a` then resumes.",
    )
    sub.add_argument("file", metavar="FILE", help="an h5dask file")
    sub.add_argument(
        "--to",
        metavar="COPY",
        help="write the repaired file to COPY, leaving FILE and its journal as they are "
        "(for read-only media)",
    )
    sub.set_defaults(run=run_repair)


def run_repair(args: argparse.Namespace) -> None:
    """``h5dask repair``: restore the last commit, then say how many ids it holds."""
    from .repair import repair

    if not os.path.exists(args.file):
        raise CLIError(f"no such file: {args.file!r}")
    undone = repair(args.file, to=args.to)
    n = len(_open(args.to or args.file))
    what = "undid an unfinished commit" if undone else "nothing to repair"
    where = f" (written to {args.to})" if args.to else ""
    print(f"{args.file}: {what}{where}; {n} committed ids")


# -- convert ------------------------------------------------------------------------------------


def _add_convert(commands: Any, common: argparse.ArgumentParser) -> None:
    sub = _command(
        commands,
        common,
        "convert",
        "Rewrite a file written by h5mapper (__arr__ datasets, __ref__ region references) "
        "in the h5dask format: the same ids, in the same order, and the same values.",
    )
    sub.add_argument("old", metavar="OLD", help="a file written by h5mapper")
    sub.add_argument("new", metavar="NEW", help="the h5dask file to write (must not exist)")
    sub.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> None:
    """``h5dask convert``: rewrite an h5mapper file, then say what the new one holds."""
    from .legacy import convert

    if not os.path.exists(args.old):
        raise CLIError(f"no such file: {args.old!r}")
    if os.path.exists(args.new):
        raise CLIError(f"{args.new!r} exists: give a new file")
    new = convert(args.old, args.new, progress=sys.stderr.isatty())
    print(f"{args.new}: {len(new)} ids, {len(new._feature_paths())} features, from {args.old}")
