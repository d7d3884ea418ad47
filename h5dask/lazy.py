"""Lazy analysis: features as dask collections, and functions mapped over stored sources.

Nothing here puts an h5py object in a dask graph. A :class:`StoredArray` holds
a file's path, its :class:`h5py.File` options and a snapshot of one dataset's
shape and dtype; each dask task opens the file by path in read mode, checks the
dataset still matches the snapshot, reads its block and closes the file. Graphs
pickle and compute on the threads and processes schedulers and on distributed
workers that share the file system.

The graph of :func:`to_dask` has one task per block of about dask's
``array.chunk-size`` (whole multiples of the HDF5 chunks), and the bag of
:func:`to_bag` one task per partition of many ids: their size follows the data,
never the number of ids.
"""

from __future__ import annotations

import copy as _copy
import fcntl
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import dask
import dask.array as da
import dask.bag as db
import h5py
import numpy as np
from dask.base import tokenize
from dask.utils import parse_bytes

from . import format as fmt
from . import legacy
from .direct import read_rows
from .errors import (
    FileFormatError,
    H5DaskError,
    LoadError,
    ReadOnlyError,
    StaleFileError,
    UnknownIdError,
    describe,
)
from .extract import unflatten
from .feature import Feature, Group
from .handle import FileHandle, as_reader, open_h5
from .index import IdIndex
from .repair import NO_LOCKS

if TYPE_CHECKING:
    from .proxy import DatasetProxy
    from .typed_file import TypedFile

__all__ = ["StoredArray", "to_dask", "to_bag", "file_to_dask", "map_sources"]


# -- reading one dataset by path, checked against a snapshot ---------------------------------------


def _kwargs_items(h5_kwargs: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    if h5_kwargs.get("driver") == "core" and not h5_kwargs.get("backing_store", True):
        raise H5DaskError("an in-memory file (driver='core') cannot be read lazily by path")
    return tuple(sorted(h5_kwargs.items()))


@contextmanager
def _open(filename: str, h5_kwargs: tuple, feature: str) -> Iterator[h5py.File]:
    """Open ``filename`` read-only, turning a vanished or broken file into a StaleFileError."""
    try:
        f = open_h5(filename, "r", **dict(h5_kwargs))
    except FileNotFoundError as exc:
        cause = "the file no longer exists (moved or deleted)"
        raise StaleFileError(filename, feature, cause) from exc
    except FileFormatError as exc:
        raise StaleFileError(filename, feature, f"the file cannot be opened: {exc}") from exc
    try:
        with fmt.reading(filename):  # what h5py raises on a damaged file
            yield f
    finally:
        f.close()


@dataclass(frozen=True)
class StoredArray:
    """A picklable, lazily opened view of rows ``[offset, offset + shape[0])`` of a dataset.

    It is what :func:`dask.array.from_array` wraps: indexing it opens the file
    by path, checks the dataset against the snapshot taken when the view was
    made, and reads the rows asked for.

    Parameters
    ----------
    filename : str
        Path of the HDF5 file.
    h5_kwargs : tuple of (str, object)
        :class:`h5py.File` options, as sorted items.
    path : str
        HDF5 path of the dataset (a feature's ``values``).
    feature : str
        Name of the feature, for error messages.
    shape : tuple of int
        Shape of the view.
    dtype : numpy.dtype
        dtype of the dataset; ``object`` for variable-length strings.
    rows : int
        Number of rows of the whole dataset when the snapshot was taken.
    offset : int
        First row of the view in the dataset.
    allow_external : bool
        Read the dataset even if its data is in other files (see
        :func:`h5dask.format.check_local`); each task checks again.
    """

    filename: str
    h5_kwargs: tuple
    path: str
    feature: str
    shape: tuple[int, ...]
    dtype: np.dtype
    rows: int
    offset: int = 0
    stored_dtype: np.dtype | None = field(default=None, compare=False)
    allow_external: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def view(self, start: int, stop: int) -> StoredArray:
        """The rows ``[start, stop)`` of this view, as a view."""
        return StoredArray(
            self.filename, self.h5_kwargs, self.path, self.feature,
            (stop - start, *self.shape[1:]), self.dtype, self.rows, self.offset + start,
            self.stored_dtype, self.allow_external,
        )  # fmt: skip

    def __getitem__(self, item: Any) -> np.ndarray:
        item = item if isinstance(item, tuple) else (item,)
        first = item[0] if item else slice(None)
        if isinstance(first, slice):
            start, stop, step = first.indices(self.shape[0])
            first = slice(start + self.offset, stop + self.offset, step)
        else:
            first = np.asarray(first) % max(self.shape[0], 1) + self.offset
        with _open(self.filename, self.h5_kwargs, self.feature) as f:
            ds = self._checked(f)
            if _whole_rows(first, item[1:], self.shape):
                block = read_rows(ds, first.start, first.stop)
                if block is not None:
                    return block
            return as_reader(ds)[(first, *item[1:])]

    def _checked(self, f: h5py.File) -> h5py.Dataset:
        ds = f.get(self.path)
        if not isinstance(ds, h5py.Dataset):
            raise StaleFileError(self.filename, self.feature, f"{self.path!r} no longer exists")
        if ds.dtype != (self.stored_dtype or self.dtype):
            cause = f"its dtype changed from {self.stored_dtype or self.dtype} to {ds.dtype}"
            raise StaleFileError(self.filename, self.feature, cause)
        if ds.shape[1:] != self.shape[1:]:
            cause = f"its rows changed shape from {self.shape[1:]} to {ds.shape[1:]}"
            raise StaleFileError(self.filename, self.feature, cause)
        if ds.shape[0] < self.rows:
            cause = f"it shrank from {self.rows} to {ds.shape[0]} rows"
            raise StaleFileError(self.filename, self.feature, cause)
        return fmt.check_local(ds, self.allow_external)

    def __dask_tokenize__(self) -> tuple:
        return (type(self).__name__, self.filename, self.path, self.shape, str(self.dtype),
                self.rows, self.offset, _mtime(self.filename))  # fmt: skip

    def __repr__(self) -> str:
        start, stop = self.offset, self.offset + self.shape[0]
        return f"<StoredArray {self.filename!r}:{self.path} rows [{start}, {stop}) {self.dtype}>"


def _whole_rows(first: Any, rest: tuple, shape: tuple[int, ...]) -> bool:
    """Whether an item selects whole rows: a step-1 slice, then whole trailing axes."""
    return (
        isinstance(first, slice)
        and first.step in (None, 1)
        and len(rest) <= len(shape) - 1
        and all(
            isinstance(s, slice) and s.indices(n) == (0, n, 1)
            for s, n in zip(rest, shape[1:], strict=False)
        )
    )


def _mtime(filename: str) -> int:
    try:
        return os.stat(filename).st_mtime_ns
    except OSError:
        return 0


def stored_array(proxy: DatasetProxy) -> StoredArray:
    """The snapshot of a feature's (or plain dataset's) concatenation as a :class:`StoredArray`."""
    if not proxy.exists:
        raise H5DaskError(f"feature {proxy.path!r} of {proxy.file.filename!r} holds no data yet")
    proxy.file.flush()
    node = proxy.file._layout()[proxy.path]
    proxy.file._check_local(proxy.path)
    if proxy.has_refs:
        proxy.refs.array  # noqa: B018 - checks the ref table against values once
    elif not node.shape:
        raise H5DaskError(f"dataset {proxy.path!r} of {proxy.file.filename!r} is a scalar")
    dtype = np.dtype(node.dtype)
    if fmt.is_string_dtype(dtype):
        dtype = np.dtype(object)
    return StoredArray(
        os.path.abspath(proxy.file.filename), _kwargs_items(proxy.file._handle.h5_kwargs),
        proxy.values_path, proxy.path, tuple(node.shape), dtype, node.shape[0], 0,
        np.dtype(node.dtype), proxy.file.allow_external,
    )  # fmt: skip


# -- dask arrays -------------------------------------------------------------------------------


def block_rows(array: StoredArray, hdf5_chunks: tuple[int, ...] | None, limit: Any = None) -> int:
    """Rows of a block: a whole multiple of the HDF5 chunk rows, about ``limit`` bytes.

    ``limit`` defaults to dask's configured ``array.chunk-size``.
    """
    limit = parse_bytes(limit or dask.config.get("array.chunk-size"))
    step = hdf5_chunks[0] if hdf5_chunks else 1
    return max(1, limit // (_row_bytes(array) * step)) * step


def _row_bytes(array: StoredArray) -> int:
    itemsize = 64 if array.dtype == object else array.dtype.itemsize
    return max(1, math.prod(array.shape[1:]) * itemsize)


def _trailing_chunks(array: StoredArray, rows: int, hdf5_chunks: tuple[int, ...] | None) -> tuple:
    """Whole trailing axes, unless one block of them would far exceed the chunk size."""
    limit = parse_bytes(dask.config.get("array.chunk-size"))
    if not hdf5_chunks or rows * _row_bytes(array) <= 2 * limit:
        return tuple(array.shape[1:])
    return tuple(hdf5_chunks[1:])


def _aligned_rows(start: int, stop: int, step: int) -> tuple[int, ...]:
    """Lengths of the blocks of ``[start, stop)`` cut at the global multiples of ``step``."""
    cuts = np.arange((start // step + 1) * step, stop, step)
    edges = np.concatenate([[start], cuts, [stop]])
    lengths = tuple(int(n) for n in np.diff(edges))
    return lengths or (0,)


def to_dask(
    proxy: DatasetProxy, id: str | int | None = None, chunks: Any = None
) -> da.Array | None:
    """A dask array over a feature's concatenation, or over one source's region of it.

    See :meth:`h5dask.DatasetProxy.to_dask`.
    """
    whole = stored_array(proxy)
    hdf5_chunks = proxy.chunks
    start, stop = 0, whole.shape[0]
    if id is not None:
        region = _region(proxy, id)
        if region is None:
            return None
        start, stop = region.start, region.stop
    array = whole.view(start, stop) if id is not None else whole
    name = f"h5dask-{proxy.path.replace('/', '.')}-{tokenize(array)}"
    return da.from_array(
        array, chunks=_chunks(array, start, stop, hdf5_chunks, chunks), name=name,
        meta=np.empty((0,) * array.ndim, dtype=array.dtype), asarray=False,
    )  # fmt: skip


def _region(proxy: DatasetProxy, id: str | int) -> slice | None:
    id = proxy._check_id(id)
    position = proxy.file.index.get(id)
    if position is None:
        raise UnknownIdError(id, proxy.file.filename, proxy.path)
    return proxy.refs[position]


def _chunks(
    array: StoredArray, start: int, stop: int, hdf5_chunks: tuple[int, ...] | None, chunks: Any
) -> Any:
    if chunks is not None and not isinstance(chunks, int):
        return chunks
    rows = chunks or block_rows(array, hdf5_chunks)
    return (_aligned_rows(start, stop, rows), *_trailing_chunks(array, rows, hdf5_chunks))


def file_to_dask(file: TypedFile) -> dict[str, Any]:
    """Every feature of ``file`` holding data, as a nested dict of dask arrays.

    See :meth:`h5dask.TypedFile.to_dask`.
    """
    out: dict[str, Any] = {}
    for path, proxy in file.features.items():
        if not proxy.exists:
            continue
        *parents, name = path.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = to_dask(proxy)
    return out


# -- dask bags of (id, array) --------------------------------------------------------------------


def to_bag(
    proxy: DatasetProxy, npartitions: int | None = None, ids_per_partition: int | None = None
) -> db.Bag:
    """A dask bag of ``(id, array)`` for every id holding data; see :meth:`DatasetProxy.to_bag`."""
    array = stored_array(proxy)
    table = proxy.refs.array
    present = np.flatnonzero(table[:, 0] >= 0)
    bounds = _partition_bounds(table, present, array, npartitions, ids_per_partition)
    args = [(array, int(lo), int(hi)) for lo, hi in bounds]
    return db.from_sequence(args, npartitions=max(1, len(args))).map_partitions(_read_partition)


def _partition_bounds(
    table: np.ndarray,
    present: np.ndarray,
    array: StoredArray,
    npartitions: int | None,
    ids_per_partition: int | None,
) -> list[tuple[int, int]]:
    """Ranges ``[lo, hi)`` of positions on the ids axis, each holding many ids."""
    if not len(present):
        return []
    if ids_per_partition is not None:
        groups = np.array_split(present, math.ceil(len(present) / max(1, ids_per_partition)))
    else:
        sizes = table[present, 1] - table[present, 0]
        cum = np.cumsum(sizes * _row_bytes(array))
        if npartitions is None:
            limit = parse_bytes(dask.config.get("array.chunk-size"))
            npartitions = max(1, math.ceil(int(cum[-1]) / limit))
        npartitions = min(npartitions, len(present))
        cuts = np.searchsorted(cum, np.arange(1, npartitions) * cum[-1] / npartitions)
        groups = [g for g in np.split(present, np.unique(cuts)) if len(g)]
    return [(int(g[0]), int(g[-1]) + 1) for g in groups]


def _read_partition(args: list[tuple[StoredArray, int, int]]) -> list[tuple[str, np.ndarray]]:
    out: list[tuple[str, np.ndarray]] = []
    for array, lo, hi in args:
        with _open(array.filename, array.h5_kwargs, array.feature) as f:
            out.extend(_read_ids(f, array, lo, hi))
    return out


def _read_ids(f: h5py.File, array: StoredArray, lo: int, hi: int) -> list[tuple[str, np.ndarray]]:
    """The ``(id, array)`` pairs of positions ``[lo, hi)``, read in sorted merged runs."""
    ds = as_reader(array._checked(f))
    group = f[array.feature]
    if fmt.REFS in group:
        refs = fmt.check_local(group[fmt.REFS], array.allow_external)
    else:  # a file of h5mapper: its region references as rows
        refs = fmt.read_refs(group, fmt.n_ids(f), array.allow_external)
    id_table = fmt.check_local(f[fmt.IDS], array.allow_external)
    if refs.shape[0] < hi or id_table.shape[0] < hi:
        raise StaleFileError(array.filename, array.feature, f"its ref table lost rows below {hi}")
    table = refs[lo:hi]
    keep = np.flatnonzero(table[:, 0] >= 0)
    ids = id_table.asstr()[lo:hi]
    return list(zip((ids[k] for k in keep), read_regions(ds, table[keep]), strict=True))


def read_regions(ds: Any, table: np.ndarray, max_gap: int = 0) -> list[np.ndarray]:
    """The rows ``table[i, 0]:table[i, 1]`` of ``ds`` for every i, with few contiguous reads.

    Regions are sorted by start and merged into runs where they touch (or lie
    less than ``max_gap`` rows apart); each run is read in one slice.
    """
    order = np.argsort(table[:, 0], kind="stable")
    out: list[np.ndarray | None] = [None] * len(table)
    run: list[int] = []
    for k in order:
        if run and table[k, 0] > table[run[-1], 1] + max_gap:
            _read_run(ds, table, run, out)
            run = []
        run.append(int(k))
    if run:
        _read_run(ds, table, run, out)
    return out  # type: ignore[return-value]


def _read_run(ds: Any, table: np.ndarray, run: list[int], out: list) -> None:
    lo = int(table[run, 0].min())
    hi = int(table[run, 1].max())
    block = ds[lo:hi]
    for k in run:
        out[k] = block[table[k, 0] - lo : table[k, 1] - lo]


# -- functions mapped over stored sources ----------------------------------------------------------


class _FileLock:
    """A lock on one file across threads (an RLock) and processes (``fcntl.lockf``).

    It keeps the reads of mapped functions and the single writer's flushes
    apart when a map writes into the file it reads: HDF5 refuses to open a
    file for writing while another process has it open. Reentrant in a thread;
    the process lock is taken by the outermost acquisition only.
    """

    _locks: ClassVar[dict[str, _FileLock]] = {}
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None

    @classmethod
    def of(cls, filename: str) -> _FileLock:
        with cls._guard:
            key = f"{os.getpid()}:{os.path.realpath(filename)}"
            return cls._locks.setdefault(key, cls())

    @contextmanager
    def hold(self, filename: str, exclusive: bool) -> Iterator[None]:
        with self.rlock:
            if self.depth == 0:
                self.fd = _locked(filename, exclusive)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0:
                    os.close(self.fd)  # closing it releases the process lock
                    self.fd = None


def _locked(filename: str, exclusive: bool) -> int:
    """A descriptor of ``filename`` holding a process lock on it.

    Raises
    ------
    FileFormatError
        Its file system has no locks (NFS without its lock daemon, Lustre
        mounted without ``flock``).
    """
    fd = os.open(filename, os.O_RDWR if exclusive else os.O_RDONLY)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in NO_LOCKS:
            raise
        raise FileFormatError(
            f"cannot lock {filename!r} ({exc.strerror}): map() into the file it reads keeps "
            "its reads and writes apart with file locks, which this file system does not "
            "have; give map() a destination= file elsewhere"
        ) from exc
    return fd


class _LockedHandle(FileHandle):
    """The writer's handle on a file that mapped functions read: every open is exclusive."""

    @contextmanager
    def open(self, write: bool = False) -> Iterator[h5py.File]:
        with _FileLock.of(self.filename).hold(self.filename, exclusive=True):
            with super().open(write) as f:
                yield f


@dataclass(frozen=True)
class _Source:
    """Where a mapped function reads: a feature of a file, by path."""

    filename: str
    h5_kwargs: tuple
    feature: str
    n_ids: int
    locked: bool
    allow_external: bool = False

    @contextmanager
    def open(self) -> Iterator[h5py.File]:
        if not self.locked:
            with _open(self.filename, self.h5_kwargs, self.feature) as f:
                yield f
            return
        with _FileLock.of(self.filename).hold(self.filename, exclusive=False):
            with _open(self.filename, self.h5_kwargs, self.feature) as f:
                yield f

    def read(self, id: str) -> np.ndarray:
        """The stored array of ``id`` (the last one read is kept for the next function)."""
        key = (self, id)
        if _LAST.get("key") != key:
            _LAST.clear()
            _LAST.update(key=key, value=self._read(id))
        return _LAST["value"]

    def _read(self, id: str) -> np.ndarray:
        with self.open() as f:
            index, table = self._tables(f)
            start, stop = table[index[id]]
            group = f[self.feature]
            values = group[fmt.VALUES if fmt.VALUES in group else legacy.VALUES]
            values = fmt.check_local(values, self.allow_external)
            return as_reader(values)[start:stop]

    def _tables(self, f: h5py.File) -> tuple[IdIndex, np.ndarray]:
        if self not in _TABLES:
            _TABLES.clear()
            ids = fmt.read_ids(f, self.allow_external)[: self.n_ids]
            refs = fmt.read_refs(f[self.feature], self.n_ids, self.allow_external)
            _TABLES[self] = (IdIndex(ids), refs)
        return _TABLES[self]


_LAST: dict[str, Any] = {}
_TABLES: dict[_Source, tuple[IdIndex, np.ndarray]] = {}


class MappedFunction(Feature):
    """A feature whose ``load(id)`` applies a function to the stored array of ``id``.

    :func:`map_sources` builds one per function and feeds them to the same
    engine and writer as :meth:`TypedFile.create`; each worker opens the
    source file by path.
    """

    def __init__(self, func: Callable[[np.ndarray], Any], source: _Source, output: str):
        self.func = func
        self.source = source
        self.output = output

    def load(self, source: Any) -> Any:
        data = self.source.read(source)
        try:
            return self.func(data)
        except Exception as exc:
            name = getattr(self.func, "__qualname__", repr(self.func))
            cause = f"{name}() on {self.source.feature!r} raised {describe(exc)}"
            raise LoadError(source, self.output, cause) from exc


def map_sources(
    proxy: DatasetProxy,
    fdict: Mapping[str, Callable[[np.ndarray], Any]],
    destination: TypedFile | None = None,
    n_workers: int | None = None,
    scheduler: Any = None,
    on_error: str = "raise",
    progress: bool = True,
) -> TypedFile:
    """Apply functions to the stored array of every id; store results as new features.

    See :meth:`h5dask.DatasetProxy.map`.
    """
    from .ingest import ON_ERROR, _ingest

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    if not fdict:
        raise ValueError("map() needs at least one function: fdict is empty")
    source_file = proxy.file
    destination = source_file if destination is None else destination
    if destination.mode == "r":
        raise ReadOnlyError(f"cannot store results in {destination.filename!r}: it is read-only")
    same = _same_file(source_file.filename, destination.filename)
    for file in (source_file, destination):
        file.flush()
        file._handle.close()  # no handle of ours may block the writer or the workers
    source = _Source(
        os.path.abspath(source_file.filename), _kwargs_items(source_file._handle.h5_kwargs),
        proxy.path, len(source_file.index), same, source_file.allow_external,
    )  # fmt: skip
    schema = _nest({out: MappedFunction(f, source, out) for out, f in fdict.items()})
    todo = _todo(proxy, destination, list(fdict))
    writer_file = _writer_file(destination) if same else destination
    # into the file the workers read, a commit fails the reads it meets: commit per 16 MiB
    cadence = {"commit_seconds": None} if same else {}
    _ingest(
        writer_file, todo, schema, n_workers, scheduler, on_error, progress, desc="map", **cadence
    )
    destination.refresh()
    return destination


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(b) and os.path.samefile(a, b)


def _writer_file(destination: TypedFile) -> TypedFile:
    """A copy of ``destination`` whose writes take the exclusive file lock."""
    copy = _copy.copy(destination)
    old = destination._handle
    copy._handle = _LockedHandle(old.filename, old.mode, False, old.allow_external, **old.h5_kwargs)
    return copy


def _nest(flat: dict[str, Feature]) -> dict[str, Feature]:
    """A schema from ``{"a/b": feature}``: groups for the parts of each path."""
    return _groups(unflatten({path.strip("/"): feature for path, feature in flat.items()}))


def _groups(tree: dict[str, Any]) -> dict[str, Feature]:
    return {k: Group(**_groups(v)) if isinstance(v, dict) else v for k, v in tree.items()}


def _todo(proxy: DatasetProxy, destination: TypedFile, outputs: list[str]) -> list[str]:
    """The ids with data in ``proxy`` that some output does not hold yet (resume)."""
    ids = proxy.ids
    positions = destination.index.positions(ids)
    found = positions >= 0
    done = found.copy()
    for output in outputs:
        stored = np.zeros(len(ids), dtype=bool)
        stored[found] = destination._refs(output.strip("/"))[positions[found], 0] >= 0
        done &= stored
    return ids[~done].tolist()
