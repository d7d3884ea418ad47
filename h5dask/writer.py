"""The single writer: buffered, batched appends in id order, then one commit.

Every write to a typed file, from :meth:`TypedFile.create` and from ``add`` or
``set``, goes through a :class:`Writer`. It checks each result against its
dataset as it arrives (so a bad result fails alone, naming its source and
feature), buffers results, and flushes them in batches: values first, then
ref rows, then the ids, then an HDF5 flush. Appending the ids is the commit
point: refs and values past the committed ids are cut the next time the file
is written, so a crash never leaves refs pointing to unwritten data.
"""

from __future__ import annotations

import math
import os
import shutil
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import chain
from time import monotonic
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from numpy import ndarray  # a global name: add's fast path checks every array against it

from . import format as fmt
from .errors import (
    CommitError,
    ConcatError,
    DiskFullError,
    H5DaskError,
    OverwriteError,
    ResultTypeError,
)
from .extract import flatten
from .handle import forks
from .index import IdIndex, utf8_keys

if TYPE_CHECKING:
    from .typed_file import TypedFile

__all__ = ["Writer", "Spec", "Block", "Commit", "concat_rows", "row_counts"]

FLUSH_BYTES = 16 << 20
FLUSH_SECONDS = 1.0
SPACE_MARGIN = 4 << 20


@dataclass
class Spec:
    """What a feature's dataset accepts: its dtype and trailing shape."""

    dtype: np.dtype
    trailing: tuple[int, ...]
    explicit: bool = False

    @cached_property
    def is_string(self) -> bool:
        return fmt.is_string_dtype(self.dtype)

    def check(self, array: np.ndarray, source: str, feature: str) -> np.ndarray:
        """Return ``array`` cast to this spec, or raise :class:`ConcatError` (it does not fit)
        or :class:`ResultTypeError` (HDF5 strings cannot hold some of its text)."""
        if array.shape[1:] != self.trailing:
            raise ConcatError(
                source,
                feature,
                f"shape {array.shape} cannot be concatenated to the dataset's rows of shape "
                f"{self.trailing}",
            )
        if self.is_string:
            if array.dtype.kind not in "UOTS":
                raise ConcatError(source, feature, f"{array.dtype} values in a string dataset")
            problem = fmt.strings_problem(array)
            if problem:
                raise ResultTypeError(source, feature, problem)
            return array
        if array.dtype.kind in "UOTS":
            raise ConcatError(source, feature, f"strings in a dataset of dtype {self.dtype}")
        if array.dtype == self.dtype:
            return array
        casting = "same_kind" if self.explicit else "safe"
        if not np.can_cast(array.dtype, self.dtype, casting):
            raise ConcatError(
                source,
                feature,
                f"dtype {array.dtype} cannot be cast ({casting}) to the dataset's {self.dtype}; "
                "set the dtype in the feature's __ds_kwargs__ or cast in load()",
            )
        return array.astype(self.dtype)


@dataclass
class Block:
    """Buffered results of consecutive ids: per feature, one array and each id's row count.

    ``rows[path][k]`` is the number of rows of ``ids[k]`` in ``values[path]``,
    ``-1`` where that id has no data for the feature.
    """

    ids: list[str]
    values: dict[str, np.ndarray]
    rows: dict[str, np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.values.values())


@dataclass
class Commit:
    """What one flush changed: the ids it appended, the new length of the ids axis, per
    feature the ref rows it wrote (positions on the ids axis, ``(start, stop)`` rows), and
    an index of the new ids if the writer built one."""

    new_ids: list[str]
    total: int
    refs: dict[str, tuple[np.ndarray, np.ndarray]]
    new_index: IdIndex | None = None

    def updated_refs(self, path: str, table: np.ndarray) -> np.ndarray:
        """A feature's ref table as it was before this commit, brought up to date."""
        updated = np.full((self.total, 2), -1, dtype=np.int64)
        updated[: len(table)] = table
        if path in self.refs:
            positions, rows = self.refs[path]
            updated[positions] = rows
        return updated


class _Column:
    """One feature's arrays of a :class:`_Run`, their bytes copied end to end."""

    __slots__ = ("dtype", "trailing", "row_bytes", "data", "rows")

    def __init__(self, spec: Spec):
        self.dtype, self.trailing = spec.dtype, spec.trailing
        self.row_bytes = spec.dtype.itemsize * math.prod(spec.trailing)
        self.data = bytearray()
        self.rows: list[int] = []

    def values(self) -> np.ndarray:
        """The arrays, concatenated (a view of :attr:`data`)."""
        return np.frombuffer(self.data, self.dtype).reshape(sum(self.rows), *self.trailing)


class _Run:
    """Consecutive adds of arrays for the same known features: ``add``'s fast path.

    Appending each array's bytes to its column is the one copy an add needs
    (its caller may reuse its arrays), and leaves nothing to concatenate at
    flush. ``bytearray.extend`` copies an array's bytes faster than numpy
    assigns to a slice, and a bytearray grows by amortised reallocation
    (glibc remaps large ones rather than copying them).
    """

    __slots__ = ("ids", "columns")

    def __init__(self, specs: dict[str, Spec]):
        self.ids: list[str] = []
        self.columns = {path: _Column(spec) for path, spec in specs.items()}

    def take_back(self, data: dict[str, Any], upto: str) -> None:
        """Take back the arrays of ``data`` copied before feature ``upto``."""
        for path in data:
            if path == upto:
                return
            column = self.columns[path]
            del column.data[len(column.data) - column.rows.pop() * column.row_bytes :]

    def block(self) -> Block:
        return Block(
            self.ids,
            {path: c.values() for path, c in self.columns.items()},
            {path: np.array(c.rows, dtype=np.int64) for path, c in self.columns.items()},
        )


class Writer:
    """Buffers results and appends them to a typed file in batches.

    Parameters
    ----------
    file : TypedFile
        The file written to; it must be open for writing.
    flush_bytes : int, optional
        Flush once this many bytes are buffered (default :data:`FLUSH_BYTES`).
    flush_seconds : float or None
        Flush on an ``append`` when the last flush is this old: occasional
        results (a log line each epoch) reach the disk at once, and a burst of
        them is committed in batches at most this far apart.
    new_ids : bool
        Promise that no appended id is in the file or appended twice (as in
        ``create``, which skips committed ids): the writer then never reads
        the id table, so its memory does not grow with the file.
    """

    def __init__(
        self,
        file: TypedFile,
        flush_bytes: int | None = None,
        flush_seconds: float | None = FLUSH_SECONDS,
        new_ids: bool = False,
    ):
        self.file = file
        self.flush_bytes = FLUSH_BYTES if flush_bytes is None else flush_bytes
        self._last_flush = -math.inf
        self.flush_seconds = flush_seconds
        self.new_ids = new_ids
        self._pending: list[Block | _Run | tuple[str, dict[str, np.ndarray]]] = []
        self._run: _Run | None = None
        self._specs: dict[str, Spec] = {}
        self._bytes = 0
        self._trimmed = False
        self._forks = forks()
        self._ids: set[str] = set()  # ids buffered or committed by this writer
        self._before: IdIndex | None = None  # the file's other ids, once an add needs them
        self._others: IdIndex | None = None  # the same, None when there are none
        self._extends: dict[str, dict[str, list[np.ndarray]]] = {}  # rows to append, by id
        self.paths: set[str] = set()  # the features of what is buffered
        _writers.add(self)

    @property
    def flush_seconds(self) -> float | None:
        """The age of the last flush at which an append flushes (None: never by age)."""
        return self._flush_seconds

    @flush_seconds.setter
    def flush_seconds(self, seconds: float | None) -> None:
        self._flush_seconds = seconds
        self._due = math.inf if seconds is None else self._last_flush + seconds

    @property
    def in_this_process(self) -> bool:
        """Whether this writer was made in this process (not inherited through fork)."""
        return self._forks == forks()

    @property
    def pending(self) -> int:
        """Number of ids buffered and not yet committed (rows to append count once an id)."""
        n = sum(1 if isinstance(e, tuple) else len(e.ids) for e in self._pending)
        return n + len(self._extends)

    def append(
        self,
        id: str,
        result: Mapping[str, Any],
        flat: bool = False,
        owned: bool = False,
        replace: bool = False,
    ) -> None:
        """Buffer a normalised result (a nested dict of arrays) for ``id``.

        ``flat`` says that ``result`` maps paths to arrays already; ``owned``
        that nobody else holds its arrays. Otherwise they are copied, so that
        what is committed is what was added, whatever the caller does with
        its arrays afterwards (``tensor.numpy()`` shares a model's memory).
        ``replace`` lets it replace data ``id`` holds already (``set``).

        Raises
        ------
        ConcatError, ResultTypeError
            An array does not fit its dataset, or cannot be stored; nothing of
            ``result`` is buffered.
        OverwriteError
            Without ``replace``: ``id`` holds data (committed or buffered) in a
            feature of ``result``; nothing of ``result`` is buffered.
        """
        if not flat:
            result = flatten(result)
        checked, new = {}, [path for path in result if path not in self._specs]
        try:
            for path, array in result.items():
                stored = self.check(id, path, array)
                checked[path] = stored if owned or stored is not array else array.copy()
            if checked and not replace and not self.new_ids:
                self._refuse_overwrite(id, checked)
        except H5DaskError:
            self._forget_specs(new)
            raise
        if not checked:
            return
        self._ids.add(id)
        self._buffer((id, checked), sum(a.nbytes for a in checked.values()))

    def extend(self, id: str, result: Mapping[str, Any], flat: bool = False) -> None:
        """Buffer rows to append to the arrays of ``id`` (new ones where it has none).

        They are committed with the next flush, after the results buffered
        with them (see :meth:`_grow`); rows appended to one id before a flush
        are concatenated in order.

        Raises
        ------
        ConcatError, ResultTypeError
            An array does not fit its dataset, or cannot be stored; nothing of
            ``result`` is buffered.
        """
        if not flat:
            result = flatten(result)
        checked, new = {}, [path for path in result if path not in self._specs]
        try:
            for path, array in result.items():
                checked[path] = self.check(id, path, array)
        except H5DaskError:
            self._forget_specs(new)
            raise
        rows = self._extends.setdefault(id, {})
        for path, array in checked.items():
            rows.setdefault(path, []).append(array.copy() if array is result[path] else array)
            self._bytes += array.nbytes
        self._ids.add(id)
        self.paths.update(checked)
        if self._bytes >= self.flush_bytes or monotonic() >= self._due:
            self.flush()

    def _refuse_overwrite(self, id: str, paths: Iterable[str]) -> None:
        """Raise :class:`OverwriteError` if ``id`` holds data in one of ``paths`` already."""
        if id not in self._ids and not self._in_file_before(id):
            return  # the usual add: an id new to the file
        held = [path for path in paths if self._holds(id, path)]
        if held:
            raise OverwriteError(
                id,
                ", ".join(held),
                f"{self.file.filename!r} holds data for this id there already, and add() "
                "never replaces it: call set() to replace it, or append() to add rows to it",
            )

    def _in_file_before(self, id: str) -> bool:
        """Whether ``id`` was in the file before this writer added to it."""
        if self._before is None:
            self._before = self.file._committed_index()
            self._others = self._before if len(self._before) else None
        return self._others is not None and self._others.position(id) >= 0

    def _holds(self, id: str, path: str) -> bool:
        """Whether ``id`` has data for ``path``, committed or buffered (the slow path)."""
        if path in self._extends.get(id, ()):
            return True
        for entry in self._pending:
            if isinstance(entry, tuple):
                if entry[0] == id and path in entry[1]:
                    return True
            elif isinstance(entry, _Run):
                if path in entry.columns and id in entry.ids:
                    return True
            elif path in entry.values and id in entry.ids:
                if entry.rows[path][entry.ids.index(id)] >= 0:
                    return True
        position = self.file._committed_index().position(id)
        if position < 0:
            return False
        refs = self.file._committed_refs(path)
        return position < len(refs) and bool(refs[position, 0] >= 0)

    def append_known(self, id: Any, data: Any) -> bool:
        """Buffer a copy of ``data`` if ``id`` is a str and ``data`` a dict mapping known
        features to arrays that fit them as they are; return whether it did (the fast path
        of ``add``, else :meth:`append`).

        It runs once per ``add``, so it is written for speed: one pass that
        checks and copies each array, taking back the copies if one fails.
        """
        run = self._run or self._new_run(data)
        if (
            run is None
            or type(id) is not str
            or type(data) is not dict
            or len(data) != len(run.columns)
            or ((not id.isascii() or "\0" in id) and fmt.id_problem(id))  # _add says why
            or id in self._ids  # added before: append() checks whether it may be again
            or (self._others is not None and self._others.position(id) >= 0)
        ):
            return False
        columns, nbytes = run.columns, 0
        for path, array in data.items():
            column = columns.get(path)
            if (
                column is None
                or type(array) is not ndarray
                or ((dtype := array.dtype) is not column.dtype and dtype != column.dtype)
                or (shape := array.shape)[1:] != column.trailing
                or not shape
            ):
                run.take_back(data, path)
                return False
            try:
                column.data.extend(array)  # type: ignore[arg-type]  # a buffer
            except TypeError:  # not C-contiguous: its bytes are not in row order
                run.take_back(data, path)
                return False
            column.rows.append(shape[0])
            nbytes += array.nbytes
        run.ids.append(id)
        self._ids.add(id)
        self._bytes += nbytes
        if self._bytes >= self.flush_bytes or monotonic() >= self._due:
            self.flush()
        return True

    def _new_run(self, data: Any) -> _Run | None:
        """Open a run for ``data``'s features, if the writer knows them all and they hold
        numbers: it is buffered from now on, so ``add`` need not ask on each call whether its
        run is new (a run whose first add fails stays empty, and a flush skips it)."""
        if type(data) is not dict or not data or not self.in_this_process:
            return None  # a forked child must not add to its parent's buffer (see _forget_runs)
        specs = {path: self._specs.get(path) for path in data}
        if any(s is None or s.dtype.kind not in "biufc" for s in specs.values()):
            return None
        if self._before is None:
            return None  # add's fast path needs the file's other ids (see _in_file_before)
        self.paths.update(specs)
        self._run = _Run(specs)  # type: ignore[arg-type]
        self._pending.append(self._run)
        return self._run

    def append_block(
        self, ids: list[str], values: Mapping[str, np.ndarray], rows: Mapping[str, np.ndarray]
    ) -> None:
        """Buffer the packed results of consecutive ids (see :class:`Block`), checked at once.

        Raises
        ------
        ConcatError, ResultTypeError
            A feature's rows do not fit its dataset, or cannot be stored; it names
            the first id of the block holding that feature, and nothing of the
            block is buffered.
        """
        checked, new = {}, [path for path in values if path not in self._specs]
        try:
            for path, array in values.items():
                first = ids[int(np.argmax(rows[path] >= 0))]
                checked[path] = self.check(first, path, array)
        except H5DaskError:
            self._forget_specs(new)
            raise
        if not checked:
            return
        has_data = np.logical_or.reduce([r >= 0 for r in rows.values()])
        if not has_data.all():  # a source that produced nothing gets no id
            ids = [id for id, keep in zip(ids, has_data.tolist(), strict=True) if keep]
            rows = {path: r[has_data] for path, r in rows.items()}
        block = Block(list(ids), checked, dict(rows))
        self._buffer(block, block.nbytes)

    def _buffer(self, entry: Block | tuple[str, dict], nbytes: int) -> None:
        self._pending.append(entry)
        self.paths.update(entry[1] if isinstance(entry, tuple) else entry.values)
        self._run = None
        self._bytes += nbytes
        if self._bytes >= self.flush_bytes or monotonic() >= self._due:
            self.flush()

    def flush_if_due(self) -> None:
        """:meth:`flush` if the last flush is :attr:`flush_seconds` old (a caller that waits
        for results calls it, so that what it buffered is committed on time)."""
        if monotonic() >= self._due:
            self.flush()

    def flush(self) -> None:
        """Write and commit every buffered result.

        Raises
        ------
        DiskFullError
            The disk has no room for the batch; nothing of it was written.
        CommitError
            Writing the batch failed (the file system refused a write, another
            process kept the file open): the journal undid it, so the file holds
            every commit before it; the error names the file, the batch and the cause.
        """
        if not self.pending:  # nothing, or a run whose first add failed
            return
        blocks = _as_blocks(self._pending)
        extends = {
            id: {path: np.concatenate(rows) for path, rows in by_path.items()}
            for id, by_path in self._extends.items()
        }
        self._pending, self._run, self._bytes, self._extends = [], None, 0, {}
        self.paths = set()
        self._last_flush = monotonic()
        self.flush_seconds = self._flush_seconds  # the next flush by age is due from now
        try:
            self.file._fresh()  # what another process committed since is read, not overwritten
            with self.file._handle.open(write=True) as f:
                commit = self._write(f, blocks, extends)
        except BaseException as exc:
            self._specs.clear()  # a feature's first write may not have happened
            self._trimmed = False
            self.file._invalidate()
            if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, DiskFullError):
                ids = list(chain.from_iterable(b.ids for b in blocks)) + list(extends)
                raise CommitError(self.file.filename, ids, _cause(exc)) from exc
            raise
        self.file._committed(commit)

    def check(self, id: str, path: str, array: np.ndarray) -> np.ndarray:
        """``array`` cast to the dataset of ``path`` (or to what its first write will create).

        Raises
        ------
        ConcatError
            The array's trailing shape or dtype does not fit, naming ``id`` and ``path``.
        ResultTypeError
            HDF5 cannot store the array faithfully (see :func:`format.rows_problem`,
            :func:`format.strings_problem`), or refuses the dataset it would create.
        """
        spec = self._specs.get(path) or self._spec_in_file(id, path)
        if spec is None:
            spec = self._new_spec(id, path, array)
        self._specs[path] = spec
        return spec.check(array, id, path)

    def _forget_specs(self, paths: list[str]) -> None:
        """Forget the specs just made for ``paths``, of a result refused: a refused add leaves
        no trace, and a later one may create those features anew."""
        for path in paths:
            self._specs.pop(path, None)

    def _spec_in_file(self, id: str, path: str) -> Spec | None:
        layout = self.file._committed_layout()
        node = layout.get(path)
        self.file._check_local(path)  # appending there would write into other files
        if node is not None and node.kind == "feature":
            return Spec(
                node.dtype, node.shape[1:], self.file._ds_kwargs(path).get("dtype") is not None
            )
        if node is not None and node.kind == "dataset":
            raise ConcatError(id, path, "the file holds a plain dataset there, not a feature")
        for parent in _parents(path):
            if parent in layout and layout[parent].kind != "group":
                raise ConcatError(id, path, f"{parent!r} is an array feature, not a group")
        if node is not None and any(p.startswith(path + "/") for p in layout):
            raise ConcatError(id, path, "the file holds a group of features there, not an array")
        return None

    def _new_spec(self, id: str, path: str, array: np.ndarray) -> Spec:
        """The spec of a feature that the file does not hold yet, whose first array is
        ``array``; its dataset is tried first, so that its first write cannot fail."""
        kwargs = self.file._ds_kwargs(path)
        problem = fmt.rows_problem(array) or fmt.dataset_problem(array, kwargs)
        if problem:
            raise ResultTypeError(id, path, problem)
        dtype = kwargs.get("dtype")
        if dtype is None:
            return Spec(fmt.storage_dtype(array), array.shape[1:])
        return Spec(np.dtype(dtype), array.shape[1:], explicit=True)

    def _positions(self, ids: list[str], n: int) -> tuple[np.ndarray, list[str], IdIndex | None]:
        """Each id's position on the ids axis, the new ids in order, and their index
        (None where the writer has no need to encode them).

        Each id is encoded and sorted once: the keys serve the lookup, the
        check that no id comes twice, and then the cached id index.
        """
        if self.new_ids:
            return np.arange(n, n + len(ids)), ids, None
        keys = utf8_keys(ids)
        batch = IdIndex(keys)
        positions = self.file._committed_index().positions(keys) if n else None
        if (positions is None or (positions < 0).all()) and batch.distinct:  # the usual add
            return np.arange(n, n + len(ids)), ids, batch
        if positions is None:
            positions = np.full(len(ids), -1)
        new: dict[str, int] = {}
        for k in np.flatnonzero(positions < 0).tolist():
            positions[k] = new.setdefault(ids[k], n + len(new))
        return positions, list(new), IdIndex(list(new))

    def _write(
        self, f: h5py.File, blocks: list[Block], extends: dict[str, dict[str, np.ndarray]]
    ) -> Commit:
        if self.file._handle.h5_kwargs.get("driver") in (None, "sec2"):
            _check_space(self.file.filename, blocks)
        if fmt.IDS not in f:
            fmt.init_root(f)
        features = fmt.feature_paths(f)
        if not self._trimmed:
            fmt.trim_uncommitted(f, features, self.file.allow_external)
            self._trimmed = True
        n = fmt.n_ids(f)
        if extends:
            blocks = self._added_ids(blocks, extends, n)
        ids = list(chain.from_iterable(b.ids for b in blocks))
        positions, new_ids, new_index = self._positions(ids, n)
        total = n + len(new_ids)
        by_path: dict[str, tuple[list, list, list]] = {}
        start = 0
        for block in blocks:
            where = positions[start : start + len(block.ids)]
            start += len(block.ids)
            for path, values in block.values.items():
                parts = by_path.setdefault(path, ([], [], []))
                parts[0].append(values)
                parts[1].append(block.rows[path])
                parts[2].append(where)
        written = {
            path: self._write_feature(
                f, path, values, np.concatenate(rows), np.concatenate(where), total
            )
            for path, (values, rows, where) in by_path.items()
        }
        if extends:
            listed = zip(ids, positions.tolist(), strict=True)
            at = {id: int(position) for id, position in listed if id in extends}
            for id in extends:
                at.setdefault(id, self.file._committed_index().position(id))
            for path, (where, rows) in self._extend(f, extends, at, total).items():
                written[path] = _merged(written.get(path), where, rows)
        for path in features:  # those this batch has no data for
            if path not in written and f[path][fmt.REFS].shape[0] < total:
                f[path][fmt.REFS].resize(total, axis=0)
        self._forget_tail(f[fmt.IDS])
        fmt.append_ids(f, new_ids if new_index is None else new_index.utf8)
        f.flush()
        return Commit(new_ids, total, written, new_index)

    def _write_feature(
        self,
        f: h5py.File,
        path: str,
        arrays: list[np.ndarray],
        rows: np.ndarray,
        positions: np.ndarray,
        total: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Append one feature's values and write their ref rows; return (positions, rows)."""
        group = f.get(path)
        if group is None or fmt.VALUES not in group:
            self.file._init_feature_group(f, path)
            sizes = rows[rows > 0]
            first_rows = int(sizes[0]) if len(sizes) else 1
            group = fmt.create_feature(
                f, path, arrays[0], first_rows, self.file._ds_kwargs(path), total
            )
        values, refs = group[fmt.VALUES], group[fmt.REFS]
        self._forget_tail(values)
        start = fmt.append_blocks(values, _storable(values, arrays))
        present = rows >= 0
        stops = start + np.cumsum(rows[present])
        table = np.stack([stops - rows[present], stops], axis=1)
        if refs.shape[0] < total:
            refs.resize(total, axis=0)
        fmt.write_ref_rows(refs, positions[present], table)
        return positions[present], table

    def _added_ids(
        self, blocks: list[Block], extends: dict[str, dict[str, np.ndarray]], n: int
    ) -> list[Block]:
        """``blocks`` and a block of the rows appended to ids neither the file nor ``blocks``
        holds yet (taken out of ``extends``): the first rows of an id are an add."""
        known = set(chain.from_iterable(b.ids for b in blocks))
        index = self.file._committed_index() if n else None
        fresh = [
            id for id in extends if id not in known and (index is None or index.position(id) < 0)
        ]
        if not fresh:
            return blocks
        return [*blocks, _block_of([(id, extends.pop(id)) for id in fresh])]

    def _extend(
        self,
        f: h5py.File,
        extends: dict[str, dict[str, np.ndarray]],
        at: dict[str, int],
        total: int,
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Append the rows of ``extends`` to their ids' arrays; per feature, (positions, rows)
        of the ref rows written."""
        by_path: dict[str, list[tuple[int, np.ndarray]]] = {}
        for id, arrays in extends.items():
            for path, array in arrays.items():
                by_path.setdefault(path, []).append((at[id], array))
        written = {}
        for path, items in by_path.items():
            group = f.get(path)
            if group is None or fmt.VALUES not in group:  # the feature's first rows
                arrays = [array for _, array in items]
                rows = np.array([len(a) for a in arrays], dtype=np.int64)
                where = np.array([p for p, _ in items], dtype=np.int64)
                written[path] = self._write_feature(f, path, arrays, rows, where, total)
            else:
                written[path] = self._grow(group, items, total)
        return written

    def _grow(
        self, group: h5py.Group, items: list[tuple[int, np.ndarray]], total: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Append rows to the regions at these positions of a feature: in place for the
        region that ends its dataset, else after a copy of the old rows at its end (the old
        ones stay where they were, unreferenced, as after ``set``)."""
        values, refs = group[fmt.VALUES], group[fmt.REFS]
        if refs.shape[0] < total:
            refs.resize(total, axis=0)
        regions = [refs[position].tolist() for position, _ in items]  # few ids a commit
        end = values.shape[0]
        order = sorted(range(len(items)), key=lambda k: regions[k][1] != end)  # the last first
        self._forget_tail(values)
        where, table = [], []
        for k in order:
            (position, rows), (start, stop) = items[k], regions[k]
            end = values.shape[0]
            if start >= 0 and stop == end:
                first, parts = start, [rows]
            elif start < 0:
                first, parts = end, [rows]
            else:
                first, parts = end, [values[start:stop], rows]
            fmt.append_blocks(values, _storable(values, parts))
            where.append(position)
            table.append((first, values.shape[0]))
        order_by_position = np.argsort(where)
        where_array = np.array(where, dtype=np.int64)[order_by_position]
        table_array = np.array(table, dtype=np.int64).reshape(-1, 2)[order_by_position]
        fmt.write_ref_rows(refs, where_array, table_array)
        return where_array, table_array

    def _forget_tail(self, ds: h5py.Dataset) -> None:
        """Spare the journal the unused end of the last chunk of ``ds``, about to be appended
        to. Only for datasets whose appends write every row they add (``values``, the ids):
        a ref table relies on HDF5's fill value for rows it grows into without writing."""
        tail = fmt.unwritten_tail(ds)
        if tail is not None:
            self.file._handle.forget(*tail)


def _check_space(filename: str, blocks: list[Block]) -> None:
    """Refuse a batch that cannot fit on the disk, before HDF5 writes any of it.

    HDF5 does not recover from a full disk mid-write (the interpreter can
    crash); checking first keeps the last commit intact and the error clear.
    """
    needed = sum(b.nbytes for b in blocks) * 11 // 10 + SPACE_MARGIN  # data, metadata, journal
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(filename))).free
    if free < needed:
        block = blocks[0]
        raise DiskFullError(
            f"source {block.ids[0]!r}, feature {next(iter(block.values))!r}: committing the "
            f"next {sum(len(b.ids) for b in blocks)} sources to {filename!r} needs about "
            f"{needed >> 20} MiB but the disk has {free >> 20} MiB free; free some space and "
            "resume with create(..., mode='a')"
        )


_writers: weakref.WeakSet[Writer] = weakref.WeakSet()


def _forget_runs() -> None:
    """In a forked child, close every writer's run: ``add``'s fast path then goes to
    :meth:`Writer._new_run`, which refuses an inherited writer, and never has to ask
    whether the writer is this process's on each add."""
    for writer in list(_writers):
        writer._run = None


os.register_at_fork(after_in_child=_forget_runs)


def _as_blocks(pending: list[Block | _Run | tuple[str, dict[str, np.ndarray]]]) -> list[Block]:
    """Turn runs and each sequence of single results into blocks, keeping the order."""
    blocks: list[Block] = []
    run: list[tuple[str, dict[str, np.ndarray]]] = []
    for entry in [*pending, None]:
        if isinstance(entry, tuple):
            run.append(entry)
            continue
        if run:
            blocks.append(_block_of(run))
            run = []
        if isinstance(entry, _Run) and entry.ids:
            blocks.append(entry.block())
        elif isinstance(entry, Block):
            blocks.append(entry)
    return blocks


def _block_of(run: list[tuple[str, dict[str, np.ndarray]]]) -> Block:
    flats = [flat for _, flat in run]
    values, rows = {}, {}
    for path in dict.fromkeys(chain.from_iterable(flats)):
        values[path], rows[path] = concat_rows([flat.get(path) for flat in flats])
    return Block([id for id, _ in run], values, rows)


def concat_rows(arrays: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    """The arrays of consecutive ids concatenated, and each id's row count (``-1``: None).

    Examples
    --------
    >>> values, rows = concat_rows([np.zeros(2), None, np.ones(1)])
    >>> values.tolist(), rows.tolist()
    ([0.0, 0.0, 1.0], [2, -1, 1])
    """
    return np.concatenate([a for a in arrays if a is not None]), row_counts(arrays)


def row_counts(arrays: list[np.ndarray | None]) -> np.ndarray:
    """Each array's number of rows, ``-1`` for None."""
    if all(a is not None for a in arrays):
        return np.fromiter(map(len, arrays), np.int64, len(arrays))  # type: ignore[arg-type]
    return np.array([-1 if a is None else len(a) for a in arrays], dtype=np.int64)


def _storable(values: h5py.Dataset, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """``arrays`` as ``values`` stores them: object arrays of str or bytes for strings."""
    if not fmt.is_string_dtype(values.dtype):
        return arrays
    return [np.array([_to_str(v) for v in a.flat], dtype=object).reshape(a.shape) for a in arrays]


def _merged(
    earlier: tuple[np.ndarray, np.ndarray] | None, positions: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ref rows written by a commit at ``earlier`` positions, then at ``positions``."""
    if earlier is None:
        return positions, rows
    kept = ~np.isin(earlier[0], positions)
    return np.concatenate([earlier[0][kept], positions]), np.concatenate([earlier[1][kept], rows])


def _cause(exc: BaseException) -> str:
    """What a failed commit's exception says, for :class:`CommitError`."""
    return f"{type(exc).__name__}: {exc}"


def _to_str(value: Any) -> Any:
    return value if isinstance(value, (str, bytes)) else str(value)


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
