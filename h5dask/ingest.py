"""``TypedFile.create``: sources -> parallel loads -> the single writer -> a typed file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import closing
from typing import Any

import h5py

from . import format as fmt
from .engine import Packed, check_scheduler, loads_here, run_loads
from .errors import ConcatError, ResultTypeError, SchemaError, SourceError
from .extract import may_load
from .failures import Failure, read_failures, record_failures
from .feature import Feature
from .session import WriterSession
from .sources import expand_sources, memory_source
from .spawning import refuse_reimported_main
from .typed_file import TypedFile, _check_schema, check_storable, open_file
from .writer import Writer

__all__ = ["create"]

ON_ERROR = ("raise", "skip")
COMMIT_SECONDS = 2.0  # of loading that a killed build can lose, by default
REFUSED = (ConcatError, ResultTypeError)  # what the writer refuses a result with, buffering none
PARALLELISM = {"mp": "processes", "threads": "threads", "none": "sync", "future": "threads"}


def create(
    cls: type[TypedFile],
    filename: str | os.PathLike,
    sources: Any,
    mode: str = "w",
    schema: Mapping[str, Feature] | None = None,
    n_workers: int | None = None,
    scheduler: Any = None,
    keep_open: bool = False,
    on_error: str = "raise",
    progress: bool = True,
    parallelism: str | None = None,
    commit_seconds: float | None = COMMIT_SECONDS,
    timeout: float | None = None,
    lock_timeout: float | None = 0.0,
    **h5_kwargs: Any,
) -> TypedFile:
    """Build a typed file from sources; see :meth:`TypedFile.create`."""
    refuse_reimported_main(f"{cls.__name__}.create({os.fspath(filename)!r})")
    schema = _resolve_schema(cls, schema)
    _check_seconds("commit_seconds", commit_seconds)
    _check_seconds("timeout", timeout)
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    if mode not in ("w", "a", "r+", "w-", "x"):
        raise ValueError(f"create() takes mode 'w', 'a', 'r+', 'w-' or 'x', not {mode!r}")
    scheduler = _scheduler(scheduler, parallelism)
    ids = expand_sources(sources)
    _check_some_load(ids, schema)
    scheduler = _for_memory_sources(ids, scheduler)
    session = WriterSession.acquire(os.fspath(filename), lock_timeout, h5_kwargs)
    try:  # the one writer of the file from here to the end: the ids skipped are the truth
        for feature in schema.values():
            feature.before_create(ids)
        check_storable(schema)  # attrs as before_create left them, before mode "w" truncates
        file = _open(cls, os.fspath(filename), mode, schema, h5_kwargs)
        file._session = session
        todo = _not_committed(file, ids)
        file._invalidate()  # read again after the build, not extended commit by commit
        with file._handle.open(write=True) as f:
            file._init_schema(f)  # attrs that before_create set
            _forget_failures(f, todo)
        _ingest(
            file, todo, schema, n_workers, scheduler, on_error, progress, new_ids=True,
            commit_seconds=commit_seconds, timeout=timeout,
        )  # fmt: skip
        _after_create(file, schema)
        file.keep_open = keep_open
    finally:
        session.release()
    return file


def _open(
    cls: type[TypedFile],
    filename: str,
    mode: str,
    schema: dict[str, Feature],
    h5_kwargs: dict[str, Any],
) -> TypedFile:
    """The file to build, opened (truncated in mode "w") under the caller's writer session."""
    open_file(filename, mode, schema, h5_kwargs).close()
    return cls(filename, mode="r+", schema=schema, **h5_kwargs)


def _check_some_load(ids: list[str], schema: dict[str, Feature]) -> None:
    """Refuse sources of which no feature's ``__re__`` matches any (a typo'd folder is
    kept as a plain source): the build would write no id and look like a success."""
    if any(may_load(id, schema) for id in ids):
        return
    shown = ", ".join(repr(id) for id in ids[:5]) + (f" and {len(ids) - 5} more" * (len(ids) > 5))
    wanted = ", ".join(f"{p}: {f.__re__}" for p, f in _patterns(schema))
    missing = [id for id in ids[:5] if "://" not in id and not os.path.exists(id)]
    hint = f"; no file or folder is named {', '.join(map(repr, missing))}" if missing else ""
    raise SourceError(
        f"no feature loads any of the {len(ids)} sources {shown}: their __re__ "
        f"({wanted}) match none of them{hint}"
    )


def _patterns(schema: Mapping[str, Feature], prefix: str = "") -> list[tuple[str, Feature]]:
    """The loading features of ``schema`` by path, Groups' members included."""
    out = []
    for name, feature in schema.items():
        members = getattr(feature, "features", None)
        if isinstance(members, Mapping):
            out += _patterns(members, prefix + name + "/")
        elif feature.loads and feature.derived_from is None:
            out.append((prefix + name, feature))
    return out


def _check_seconds(name: str, seconds: float | None) -> None:
    if seconds is not None and not (isinstance(seconds, (int, float)) and seconds > 0):
        raise ValueError(f"{name} must be a number of seconds > 0 or None, not {seconds!r}")


def _for_memory_sources(ids: list[str], scheduler: Any) -> Any:
    """The scheduler for ``ids``: ``"threads"`` for the default engine if some source is in
    fsspec's memory filesystem, which lives in this process only.

    Raises
    ------
    SourceError
        Some source is in the memory filesystem and ``scheduler`` loads in other processes.
    """
    where = loads_here(scheduler) if (source := memory_source(ids)) is not None else True
    if where:
        return scheduler
    if where is None:
        return "threads"  # the embedded cluster's workers could not read them
    raise SourceError(
        f"source {source!r} is a file of fsspec's memory filesystem, which lives in this "
        f"process only: the worker processes of scheduler={scheduler!r} cannot read it. "
        "Load such sources with scheduler='threads' or 'sync' (the default engine does), or "
        "write them to a file system that the workers share"
    )


def _not_committed(file: TypedFile, ids: list[str]) -> list[str]:
    """The ids not in ``file`` yet (``ids`` itself when the file holds none: no copy)."""
    if not len(file.index):
        return ids
    return [i for i, pos in zip(ids, file.index.positions(ids), strict=True) if pos < 0]


def _forget_failures(f: h5py.File, retried: list[str]) -> None:
    """Drop the recorded failures of the sources tried again (a resumed build)."""
    failures = read_failures(f)
    if not failures:
        return
    again = set(retried)
    kept = [failure for failure in failures if failure.source not in again]
    if len(kept) < len(failures):
        del f[fmt.ERRORS]
        record_failures(f, kept)


def _scheduler(scheduler: Any, parallelism: str | None) -> Any:
    """The scheduler to use, checked before any file is touched."""
    if parallelism is not None:
        if parallelism not in PARALLELISM:
            raise ValueError(
                f"parallelism must be one of {sorted(PARALLELISM)}, not {parallelism!r}"
            )
        if scheduler is not None:
            raise ValueError("give scheduler= or parallelism= (h5mapper's name), not both")
        scheduler = PARALLELISM[parallelism]
    check_scheduler(scheduler)
    return scheduler


def _resolve_schema(
    cls: type[TypedFile], schema: Mapping[str, Feature] | None
) -> dict[str, Feature]:
    if schema is not None and not schema:
        raise SchemaError("the schema is empty: give create() at least one Feature")
    schema = _check_schema(schema, cls) if schema else dict(cls.__schema__)
    if not schema:
        raise SchemaError(
            f"{cls.__name__} declares no Feature: declare some as class attributes or pass schema="
        )
    if not any(feature.loads for feature in schema.values()):
        names = ", ".join(schema)
        raise SchemaError(
            f"no feature of the schema ({names}) implements load(); nothing to create"
        )
    return schema


def _ingest(
    file: TypedFile,
    ids: list[str],
    schema: dict[str, Feature],
    n_workers: int | None,
    scheduler: Any,
    on_error: str,
    progress: bool,
    new_ids: bool = False,
    desc: str = "create",
    commit_seconds: float | None = COMMIT_SECONDS,
    timeout: float | None = None,
) -> None:
    """Load ``ids`` with ``schema`` and write the results to ``file`` in id order.

    ``new_ids`` promises that no id is in the file yet (see :class:`Writer`), which
    only the writer session of the whole build (``create``'s) can make true.
    The writer commits per 16 MiB of results and, while results come, at least
    every ``commit_seconds`` (None: only per 16 MiB and at the end). A source
    whose loads run longer than ``timeout`` seconds fails (:class:`LoadTimeoutError`).
    """
    with file._writing():
        writer = Writer(file, flush_seconds=commit_seconds, new_ids=new_ids)
        failures: list[Failure] = []
        tick = None if commit_seconds is None else commit_seconds / 4
        loads = run_loads(
            ids, schema, n_workers, scheduler, progress, desc, writer.flush_if_due, tick, timeout
        )
        try:
            with closing(loads) as batches:  # the scheduler stops now, not when collected
                for packed in batches:
                    _write_packed(writer, packed, on_error, failures)
        finally:
            writer.flush()
            if failures:
                with file._handle.open(write=True) as f:
                    record_failures(f, failures)


def _write_packed(writer: Writer, packed: Packed, on_error: str, failures: list[Failure]) -> None:
    """Buffer a partition's results whole, or id by id where some failed."""
    if packed.dense:
        try:
            writer.append_block(packed.ids, packed.values, packed.rows)
            return
        except REFUSED:  # a result does not fit: a commit's failure is never caught here
            pass  # find, in id order, which ids fail and why
    for id, result in packed:
        if isinstance(result, Exception):
            _fail(result, id, on_error, failures)
            continue
        try:
            writer.append(id, result, flat=True, owned=True)
        except REFUSED as exc:
            _fail(exc, id, on_error, failures)


def _fail(error: Exception, id: str, on_error: str, failures: list[Failure]) -> None:
    if on_error == "raise":
        raise error
    failures.append(Failure.from_error(error, id))


def _after_create(file: TypedFile, schema: dict[str, Feature]) -> None:
    keep_open = file.keep_open
    file.keep_open = True
    try:
        for name, feature in schema.items():
            feature.after_create(file, name)
        hook = getattr(file, "after_create", None)
        if callable(hook):
            hook()
    finally:
        file.flush()
        file.keep_open = keep_open
