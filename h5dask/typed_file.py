"""TypedFile: a type of ``.h5`` file declared as a Python class of features."""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from itertools import chain
from typing import Any, ClassVar

import h5py
import numpy as np

from . import format as fmt
from . import legacy
from .display import html_table, text_table
from .errors import FileFormatError, ReadOnlyError, ResultTypeError, SchemaError
from .extract import flatten, load_schema, normalize
from .failures import Failure, read_failures
from .feature import Feature, Group, name_problem
from .handle import (
    FileHandle,
    as_reader,
    create_atomically,
    creates_file,
    open_h5,
    without_chunk_cache,
)
from .index import IdIndex
from .proxy import DatasetProxy, GroupProxy, Proxy
from .session import WriterSession
from .writer import Commit, Writer

__all__ = ["TypedFile", "Failure", "check_storable"]

MODES = ("r", "r+", "a", "w", "w-", "x")
_WRITING: weakref.WeakSet[TypedFile] = weakref.WeakSet()


class TypedFile:
    """An HDF5 file whose layout is declared by the class's :class:`Feature` attributes.

    Parameters
    ----------
    filename : str or os.PathLike
        Path of the file.
    mode : {"r", "r+", "a", "w", "w-", "x"}
        As in :class:`h5py.File`: read only, read/write an existing file,
        read/write creating it if needed, truncate, create a new file.
    keep_open : bool
        Keep one HDF5 handle open between calls (per process). By default the
        file is opened and closed around each call, so other processes
        (dask workers, DataLoader workers) can open it.
    schema : dict of Feature, optional
        Features of an ad hoc file, instead of the class's attributes.
    allow_external : bool
        Read (and write) datasets whose data HDF5 keeps in other files: external
        raw storage and virtual datasets. By default h5dask opens no file but this
        one and refuses them with :class:`~h5dask.errors.ExternalFileError` (a
        file from someone else could name any file, ``/etc/passwd`` too). External
        and soft links are never followed either way.
    lock_timeout : float or None
        Seconds to wait for another writer of the file to finish (default 0:
        raise :class:`~h5dask.errors.FileLockedError` at once; None: wait as long
        as it takes). A file has one writer at a time: the first write of this
        object (``add``, ``append``, ``set``, item assignment) makes it the file's
        writer until :meth:`close`, ``with``'s exit, garbage collection or the end
        of the process; opening in a mode that writes ("w", "a", "x") is refused
        likewise while another writer holds the file. Readers (``mode="r"``, other
        processes' DataLoader workers and dask tasks) are never blocked.
    **h5_kwargs
        Passed to :class:`h5py.File` (``driver="core"``, ``locking=False``...).
        ``locking=False`` also leaves out the writer session.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> import h5dask as h5m
    >>> class Logs(h5m.TypedFile):
    ...     loss = h5m.Array()
    >>> path = os.path.join(tempfile.mkdtemp(), "logs.h5")
    >>> with Logs(path, mode="w") as logs:
    ...     _ = logs.add("train", {"loss": np.array([0.9, 0.5, 0.2])})
    ...     logs.loss.get("train")
    array([0.9, 0.5, 0.2])
    """

    __schema__: ClassVar[dict[str, Feature]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        schema: dict[str, Feature] = {}
        for klass in reversed(cls.__mro__):
            schema.update({k: v for k, v in vars(klass).items() if isinstance(v, Feature)})
        _check_names(cls, schema)
        cls.__schema__ = schema

    def __init__(
        self,
        filename: str | os.PathLike,
        mode: str = "r",
        keep_open: bool = False,
        schema: Mapping[str, Feature] | None = None,
        allow_external: bool = False,
        lock_timeout: float | None = 0.0,
        **h5_kwargs: Any,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.filename = os.fspath(filename)
        self.schema: dict[str, Feature] = (
            _check_schema(schema, type(self)) if schema else dict(self.__schema__)
        )
        if mode != "r":
            check_storable(self.schema)
        if h5_kwargs.get("driver") == "core" and not h5_kwargs.get("backing_store", True):
            keep_open = True  # an in-memory file lives only as long as its handle
        self._handle = FileHandle(
            self.filename, "r" if mode == "r" else "r+", keep_open, allow_external, **h5_kwargs
        )
        self._cache: dict[str, Any] = {}
        self._writer: Writer | None = None
        self.lock_timeout = lock_timeout
        self._session: WriterSession | None = None
        if mode in ("r", "r+"):
            self._layout()  # fail now on a missing or non-HDF5 file
            if mode == "r+" and self.legacy:
                raise FileFormatError(_legacy_message(self.filename))
            return
        with self._writing():  # never truncate or relabel a file another writer is writing
            f = open_file(self.filename, mode, self.schema, h5_kwargs)  # kept if keep_open
        self._cache["layout"] = fmt.read_layout(f)  # the first add need not reopen the file
        if keep_open:
            self._handle._file = self._cache["held"] = f
        else:
            f.close()
        self._cache["version"] = _version(self.filename, h5_kwargs)

    # -- opening, closing, pickling ---------------------------------------------------------

    @property
    def mode(self) -> str:
        """``"r"`` for a read-only file, else ``"r+"``."""
        return self._handle.mode

    @property
    def allow_external(self) -> bool:
        """Whether datasets stored in other files are read (see the class's parameters)."""
        return self._handle.allow_external

    @property
    def keep_open(self) -> bool:
        """Whether an HDF5 handle stays open between calls; settable."""
        return self._handle.keep_open

    @keep_open.setter
    def keep_open(self, value: bool) -> None:
        if not value:
            self.flush()
            self._handle.close()
        self._handle.keep_open = bool(value)

    def handle(self, mode: str | None = None) -> h5py.File:
        """An open :class:`h5py.File` of this process (kept when ``keep_open``).

        Prefer the proxies; close what this returns when ``keep_open`` is False.
        """
        self.flush()
        if self.keep_open:
            return self._handle._cached(write=(mode or self.mode) != "r")
        return open_h5(self.filename, mode or self.mode, **self._handle.h5_kwargs)

    @property
    def f_(self) -> h5py.File | None:
        """The HDF5 handle this process keeps open (``keep_open``), or None (h5mapper's name)."""
        return self._handle.kept

    def open(self, mode: str = "r") -> TypedFile:
        """Read (``"r"``) or read and write (``"r+"``, ``"a"``, ``"w"``) from now on; returns self.

        The kept handle, if any, is closed when the mode changes. Unlike
        h5mapper's, ``"w"`` never truncates: that is ``TypedFile(path, "w")``.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        mode = "r" if mode == "r" else "r+"
        if mode == "r+" and self.legacy:
            raise FileFormatError(_legacy_message(self.filename))
        if mode != self._handle.mode:
            self.close()
            self._handle.mode = mode
        return self

    @property
    def legacy(self) -> bool:
        """Whether h5mapper wrote this file (read-only then; see :mod:`h5dask.legacy`)."""
        self._layout()
        return self._cache.get("legacy", False)

    @property
    def __src__(self) -> Any:
        """The id table as h5mapper exposes it: ``file.__src__.id`` is every id, in file order."""
        from .compat import SourceTable

        return SourceTable(self)

    def flush(self) -> None:
        """Commit every buffered ``add`` to the file."""
        self._commit()
        if self._handle.writable:
            self._handle._cached(write=True).flush()

    def close(self) -> None:
        """Commit buffered writes, close the kept handle, if any, and end the writer session.

        The file stays usable: a later write starts a new session.
        """
        self.flush()
        self._handle.close()
        self._end_session()

    def __enter__(self) -> TypedFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.flush()  # then the writer session ends with its last holder (see __copy__)
        except Exception:  # noqa: S110 - never raise from a finaliser
            pass

    def __getstate__(self) -> dict[str, Any]:
        self.flush()
        state = self.__dict__.copy()
        state["_cache"] = {}
        state["_writer"] = None
        state["_session"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __copy__(self) -> TypedFile:
        """A copy in this process, sharing the writer session (a pickled one holds none)."""
        copy = type(self).__new__(type(self))
        copy.__setstate__({**self.__getstate__(), "_session": self.__dict__.get("_session")})
        return copy

    # -- ids -----------------------------------------------------------------------------------

    @property
    def index(self) -> IdIndex:
        """Mapping of id to its position on the ids axis."""
        self._commit()
        return self._committed_index()

    @property
    def ids(self) -> np.ndarray:
        """Every id, in file order (a numpy ``StringDType`` array)."""
        return self.index.ids

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, id: object) -> bool:
        return id in self.index

    def refresh(self) -> TypedFile:
        """Forget cached tables, to see what another process wrote since.

        Reads check the file's version themselves (see :meth:`_fresh`); this
        forces a reread, e.g. on a file system with coarse timestamps.
        """
        self._invalidate()
        return self

    # -- proxies -------------------------------------------------------------------------------

    def get_proxy(self, path: str) -> Proxy:
        """The proxy of a group or feature by its path, e.g. ``"data/images"``.

        Raises
        ------
        KeyError
            Neither the file nor the schema has anything at ``path``.
        """
        path = path.strip("/")
        if not path:
            return GroupProxy(self, "", None)
        node = self._committed_layout().get(path)  # reaching a proxy commits nothing
        feature = self._schema_node(path)
        if node is not None and node.kind != "group":
            return DatasetProxy(self, path, feature, has_refs=node.kind == "feature")
        if node is None and path in self._buffered_paths():
            return DatasetProxy(self, path, feature, has_refs=True)
        if self._children(path) or isinstance(feature, Group):
            return GroupProxy(self, path, feature)
        if node is not None or feature is not None:
            return DatasetProxy(self, path, feature, has_refs=True)
        raise KeyError(f"{self.filename!r} has no group or feature {path!r}")

    @property
    def root(self) -> GroupProxy:
        """The proxy of the root group."""
        return GroupProxy(self, "", None)

    @property
    def features(self) -> dict[str, DatasetProxy]:
        """Every feature and dataset of the file, by path."""
        return {path: self.get_proxy(path) for path in self._leaf_paths()}

    def keys(self) -> list[str]:
        """Names of the top-level groups and features."""
        return self._children("")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or "_handle" not in self.__dict__:
            raise AttributeError(name)
        if name in self._children(""):
            return self.get_proxy(name)
        raise AttributeError(f"{type(self).__name__} has no attribute or feature {name!r}")

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._children("")))

    # -- reading and writing by id ---------------------------------------------------------------

    def get(self, id: str | int) -> dict[str, Any]:
        """Every feature's data for ``id``, as a nested dict; see :meth:`GroupProxy.get`."""
        return self.root.get(id)

    def __getitem__(self, id: str | int) -> dict[str, Any]:
        return self.root.get(id)

    def __setitem__(self, id: str, data: dict[str, Any]) -> None:
        self.root.set(id, data)

    def add(self, id: str, data: dict[str, Any]) -> TypedFile:
        """Add ``data``, a (nested) dict by feature name, for ``id``.

        ``id`` may be new, or a known id without data in these features yet;
        data an id holds is never replaced by ``add`` (:meth:`set` replaces it,
        :meth:`append` adds rows to it).

        An add is committed at once when the last commit is more than a
        second old, so occasional adds (logs of each epoch) reach the disk
        immediately; a burst of adds is buffered and committed in batches,
        at the latest on the next add a second later, :meth:`flush`,
        :meth:`close`, any read through this object, or interpreter exit.

        Raises
        ------
        OverwriteError
            ``id`` holds data in one of these features already (committed, or
            added before in this buffer); nothing of this add is buffered.
        ConcatError
            An array does not fit its feature's dataset; nothing is buffered.
        FileLockedError
            Another writer holds the file (see ``lock_timeout``).
        """
        writer = self._writer  # the fast path: more arrays for features it already checked
        if writer is None or not writer.append_known(id, data):
            self._add(id, data)
        return self

    def append(self, id: str, data: dict[str, Any]) -> TypedFile:
        """Append rows to the arrays of ``id`` in the features of ``data`` (a per-step log).

        Buffered and committed as :meth:`add` is; an id or feature without data
        yet gets these rows as its first. A scalar is one row.

        Examples
        --------
        >>> import tempfile, os
        >>> import h5dask as h5m
        >>> class Run(h5m.TypedFile):
        ...     logs = h5m.Group(loss=h5m.Array())
        >>> run = Run(os.path.join(tempfile.mkdtemp(), "run.h5"), mode="w")
        >>> for step_loss in [0.9, 0.5, 0.2]:
        ...     _ = run.logs.append("train", {"loss": step_loss})
        >>> run.logs.loss.get("train")
        array([0.9, 0.5, 0.2])
        """
        self._add(id, data, "append")
        return self

    def set(self, id: str, data: dict[str, Any]) -> None:
        """Replace the data of ``id`` in the features named by ``data``."""
        self.root.set(id, data)

    @classmethod
    def create(
        cls,
        filename: str | os.PathLike,
        sources: Any,
        mode: str = "w",
        schema: Mapping[str, Feature] | None = None,
        n_workers: int | None = None,
        scheduler: Any = None,
        keep_open: bool = False,
        on_error: str = "raise",
        progress: bool = True,
        commit_seconds: float | None = 2.0,
        timeout: float | None = None,
        lock_timeout: float | None = 0.0,
        **kwargs: Any,
    ) -> TypedFile:
        """Build a file from sources with parallel ``load`` tasks and one writer.

        Parameters
        ----------
        filename : str or os.PathLike
            The file to write.
        sources : str, os.PathLike or iterable of them
            Paths, directories (walked), globs, fsspec URLs or plain strings.
        mode : {"w", "a", "r+", "w-", "x"}
            ``"w"`` truncates; ``"a"`` and ``"r+"`` add to an existing file and
            skip ids already committed, so an interrupted build resumes.
        schema : dict of Feature, optional
            Features of an ad hoc file instead of the class's attributes.
        n_workers : int, optional
            Worker processes of the embedded local cluster (default: cores).
        scheduler : str or distributed.Client, optional
            ``"sync"``, ``"threads"``, ``"processes"``, a scheduler address or a
            Client. Default: the active distributed Client, else an embedded
            local cluster. ``"threads"`` runs loads on ``n_workers`` threads
            only if they load faster together than one alone (it measures).
        keep_open : bool
            Keep the returned file's HDF5 handle open.
        on_error : {"raise", "skip"}
            Stop at the first failure, or record failures in the file
            (``file.errors``) and go on.
        progress : bool
            Show a progress bar.
        commit_seconds : float or None
            Commit what was loaded at least this often (and per 16 MiB of
            results): a build killed meanwhile loses at most about this many
            seconds of loading, and ``mode="a"`` resumes it. ``None``: commit
            per 16 MiB only, and at the end. A commit costs a few milliseconds.
        timeout : float or None
            Seconds that a source's loads may run. A source that runs longer
            fails with a :class:`~h5dask.errors.LoadTimeoutError` naming it, the
            feature and the line its load was at (recorded with
            ``on_error="skip"``, and the build goes on); the thread running it is
            left behind until its load returns (see ``docs/RELIABILITY.md``).
            ``None`` (the default): no limit.
        lock_timeout : float or None
            Seconds to wait for another writer of the file (another build, a
            TypedFile that adds to it) to finish; 0 (the default) raises at once,
            None waits as long as it takes. The build is the file's one writer
            from its start to its end.
        **kwargs
            ``parallelism`` (h5mapper's name: "mp", "threads", "none") and
            :class:`h5py.File` options.

        Returns
        -------
        TypedFile
            The new file, open in mode ``"r+"``.

        Raises
        ------
        SchemaError
            The schema is empty or loads nothing.
        SourceError
            No sources (``[]``, an empty folder or glob), or none that a feature's
            ``__re__`` matches (a typo'd folder is kept as a plain source): the
            file is left as it was. Build an empty file with ``cls(path, mode="w")``.
        LoadError, LoadTimeoutError, ConcatError
            With ``on_error="raise"``: the first source that failed, naming
            the source, the feature and the cause; every source before it
            stays committed.
        FileLockedError
            Another writer holds the file (past ``lock_timeout``); nothing was written.
        DiskFullError, CommitError
            A commit failed (no room on the disk, a write the file system refused,
            a reader keeping the file open): every commit before it stays, and
            ``mode="a"`` resumes.
        """
        from .ingest import create

        return create(
            cls,
            filename,
            sources,
            mode,
            schema,
            n_workers,
            scheduler,
            keep_open,
            on_error,
            progress,
            commit_seconds=commit_seconds,
            timeout=timeout,
            lock_timeout=lock_timeout,
            **kwargs,
        )

    @classmethod
    def load(cls, source: Any, schema: Mapping[str, Feature] | None = None) -> dict[str, Any]:
        """Run the schema's features on one source, as ``create`` does, without writing."""
        return load_schema(source, schema or cls.__schema__)

    @property
    def attrs(self) -> dict[str, Any]:
        """The root group's attributes, decoded."""
        return self._attrs("")

    def serve(
        self, batch: Any, sampling_jitter: int = 0, ids: Any = None, **loader_kwargs: Any
    ) -> Any:
        """A torch ``DataLoader`` of batches shaped like ``batch``, its items paired by id
        (``ids``: the ids to serve, or ``"shared"``); see :func:`h5dask.serve.serve`.
        ``sampling_jitter`` moves each window of an :class:`~h5dask.AsSlice` item
        by a random number of steps in ``[-sampling_jitter, sampling_jitter)``
        (h5mapper's second argument).

        Examples
        --------
        >>> loader = exp.serve(dict(x=h5m.Input(key="data/images", getter=h5m.GetId()),
        ...                         y=h5m.Target(key="data/labels", getter=h5m.GetId())),
        ...                    batch_size=32, shuffle=True, num_workers=2)  # doctest: +SKIP
        """
        from .serve import serve

        return serve(self, batch, ids, sampling_jitter, **loader_kwargs)

    # -- internals used by proxies and the writer -----------------------------------------------

    def _add(self, id: str, data: Any, how: str = "add") -> None:
        """Check, normalise and buffer ``data``: ``add`` without its fast path, or (``how``)
        a ``"set"`` that replaces data, or an ``"append"`` of rows."""
        if not isinstance(id, str):
            raise TypeError(f"ids are str, not {type(id).__name__}")
        problem = fmt.id_problem(id)
        if problem:
            raise ValueError(f"id {id!r} {problem}")
        flat = _flat_arrays(data)
        result = flat if flat is not None else normalize(data, id, "")
        if result is None:
            return
        if not isinstance(result, dict):
            raise ResultTypeError(id, "", f"{how}() on a file takes a dict of features")
        if self.mode == "r":
            self._check_writable(f"source {id!r}, feature {', '.join(flatten(result))!r}")
        writer = self._get_writer()
        if how == "append":
            writer.extend(id, result, flat=flat is not None)
        else:
            writer.append(id, result, flat=flat is not None, replace=how == "set")

    def _get_writer(self) -> Writer:
        self._hold_session()
        if self._writer is None or not self._writer.in_this_process:
            self._writer = Writer(self)
            _WRITING.add(self)  # what it buffers is committed at exit
        return self._writer

    def _hold_session(self) -> None:
        """Be the file's one writer from this first write until :meth:`close` (see
        :mod:`h5dask.session`); a session held already (or lent by ``create``) is kept.

        Raises
        ------
        FileLockedError
            Another writer holds the file past :attr:`lock_timeout` seconds.
        """
        session = self.__dict__.get("_session")
        if session is None or not session.held:
            session = WriterSession.acquire(
                self.filename, self.lock_timeout, self._handle.h5_kwargs
            )
            self._session = None
            self._fresh()  # what the last writer committed, read before the session skips it
            self._session = session

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the writer session for one call (opening, ``map``), unless it is held already."""
        session = self.__dict__.get("_session")
        if session is not None and session.held:
            yield
            return
        self._hold_session()
        try:
            yield
        finally:
            self._end_session()

    def _end_session(self) -> None:
        session, self._session = self.__dict__.get("_session"), None
        if session is not None:
            session.release()

    def _commit(self) -> None:
        """Write what this process's writer buffers, so that reads see it."""
        writer = self.__dict__.get("_writer")
        if writer is not None and writer.in_this_process and writer.pending:
            writer.flush()

    def _layout(self) -> dict[str, fmt.Node]:
        """What the file holds, buffered writes included."""
        self._commit()
        return self._committed_layout()

    def _fresh(self) -> None:
        """Forget every cached table if another process changed the file since they were read.

        The file's identity, size, and modification and change times (one
        ``stat``) are its version: another process's commit, or a file rebuilt
        in its place, changes them; this process's own commits record the new
        version (:meth:`_committed`), so they cost no reread. A handle kept open
        since the last check needs none: HDF5's lock stops other writers while
        it is held. A kept read-only handle is reopened, as HDF5 caches what it read.
        The writer checks before each commit; inside it, the number of ids is compared.
        """
        cache, handle = self._cache, self._handle
        if handle.writing is not None:  # in this process's commit, which holds the lock and
            if "index" in cache and len(cache["index"]) != fmt.n_ids(handle.writing):
                cache.clear()  # touched the file when it opened it: compare the ids instead
            return
        if handle.locks and handle.holds(cache.get("held")):
            return
        session = self.__dict__.get("_session")
        if session is not None and session.locks and session.held:
            return  # this object is the file's one writer: no other commit can come
        kept = handle.kept
        stamp = _version(self.filename, handle.h5_kwargs)
        if cache.get("version") != stamp:
            if cache and kept is not None and kept.mode == "r":
                handle.close()
                kept = None
            cache.clear()
            cache["version"] = stamp
        if kept is not None:
            cache["held"] = kept

    def _committed_layout(self) -> dict[str, fmt.Node]:
        self._fresh()
        if "layout" not in self._cache:
            with self._handle.open() as f:
                fmt.check_root(f)
                self._cache["layout"] = fmt.read_layout(f)
                self._cache["legacy"] = legacy.is_h5mapper(f)
        return self._cache["layout"]

    def _committed_index(self) -> IdIndex:
        self._fresh()
        if "index" not in self._cache:
            with self._handle.open() as f:
                index = IdIndex(fmt.read_ids(f, self.allow_external))
            _check_unique(index, self.filename)
            self._cache["index"] = index
        return self._cache["index"]

    def _refs(self, path: str) -> np.ndarray:
        self._commit()
        return self._committed_refs(path)

    def _committed_refs(self, path: str) -> np.ndarray:
        """The ref table of ``path`` as committed (buffered writes not included)."""
        self._fresh()
        key = "refs:" + path
        if key not in self._cache:
            node = self._committed_layout().get(path)
            with self._handle.open() as f:
                n = fmt.n_ids(f)
                if node is None or node.kind != "feature":
                    self._cache[key] = np.full((n, 2), -1, dtype=np.int64)
                else:
                    self._check_local(path)
                    self._cache[key] = fmt.read_refs(f[path], n, self.allow_external)
        return self._cache[key]

    def _check_local(self, path: str) -> None:
        """Refuse the feature or dataset at ``path`` if HDF5 reads its data from other files
        (:class:`~h5dask.errors.ExternalFileError`), unless ``allow_external``. Only a
        committed dataset can be stored elsewhere: nothing buffered is committed for it."""
        node = self._committed_layout().get(path)
        if node is not None and not self.allow_external:
            fmt.refuse_other_files(self.filename, path, node.other_files)

    def _invalidate(self) -> None:
        self._cache.clear()

    def _committed(self, commit: Commit) -> None:
        """Bring what is cached up to date with a commit of this process's writer.

        The id index and ref tables are extended, not read again: rebuilding
        them after every add would cost a sort of every id in the file.
        """
        cache = self._cache
        cache.pop("layout", None)
        cache.pop("held", None)
        if "index" in cache and len(cache["index"]) != commit.total - len(commit.new_ids):
            cache.clear()  # another process committed before this one: read it all again
        cache["version"] = _version(self.filename, self._handle.h5_kwargs)
        if "index" in cache:
            new = commit.new_ids if commit.new_index is None else commit.new_index
            cache["index"] = cache["index"].extended(new)
        elif commit.new_index is not None and commit.total == len(commit.new_index):
            cache["index"] = commit.new_index  # the file had no ids: no need to read
        for key in [key for key in cache if key.startswith("refs:")]:
            cache[key] = commit.updated_refs(key.removeprefix("refs:"), cache[key])

    def _read(self, path: str, item: Any) -> Any:
        """Read ``item`` of the dataset at ``path``, checking the file's version while it is
        open (held, no other process commits): see :attr:`_tables_version`."""
        self._commit()
        if self.keep_open:
            self._fresh()
            with fmt.reading(self.filename):
                return self._handle.reader(path)[item]
        with self._handle.open() as f:
            self._fresh()
            return as_reader(f[path])[item]

    @property
    def _tables_version(self) -> Any:
        """The version of the file the cached tables were read from: a read that changes it
        found the file changed since a caller looked up a region in them."""
        return self._cache.get("version")

    def _check_writable(self, what: str) -> None:
        """Raise :class:`ReadOnlyError` naming ``what`` was to be written, in mode ``"r"``."""
        if self.mode == "r":
            raise ReadOnlyError(
                f"{what}: {self.filename!r} is open read-only; open it with mode='r+'"
            )

    def _write(self, path: str, item: Any, value: Any) -> None:
        self._hold_session()
        self._commit()
        self._fresh()
        with self._handle.open(write=True) as f:
            f[path][item] = value
        self._cache["version"] = _version(self.filename, self._handle.h5_kwargs)  # its own

    def _attrs(self, path: str) -> dict[str, Any]:
        self._commit()
        with self._handle.open() as f:
            obj = fmt.hard_get(f, path)
            return fmt.read_attrs(obj) if obj is not None else {}

    def _children(self, path: str) -> list[str]:
        """Names in the group at ``path``: declared, committed, and of buffered writes (listed
        without committing them, so that ``file.logs.add(...)`` stays buffered)."""
        names: dict[str, None] = {}
        node = self.schema if not path else getattr(self._schema_node(path), "features", {})
        names.update(dict.fromkeys(node))
        prefix = path + "/" if path else ""
        for key in chain(self._committed_layout(), self._buffered_paths()):
            if key.startswith(prefix) and key != prefix:
                names[key[len(prefix) :].split("/", 1)[0]] = None
        return list(names)

    def _buffered_paths(self) -> set[str]:
        writer = self.__dict__.get("_writer")
        return writer.paths if writer is not None and writer.in_this_process else set()

    def _leaf_paths(self) -> list[str]:
        return [p for p, node in self._layout().items() if node.kind != "group"]

    def _feature_paths(self) -> list[str]:
        return [p for p, node in self._layout().items() if node.kind == "feature"]

    def _schema_node(self, path: str) -> Feature | None:
        """The schema feature at ``path``, or the feature whose dict results live there."""
        node: Any = None
        members: Mapping[str, Feature] = self.schema
        for part in path.split("/"):
            if part not in members:
                return node if node is not None and not isinstance(node, Group) else None
            node = members[part]
            members = node.features if isinstance(node, Group) else {}
        return node

    def _ds_kwargs(self, path: str) -> dict[str, Any]:
        """h5py dataset kwargs for ``path``, from its feature's ``__ds_kwargs__``."""
        parts = path.split("/")
        members: Mapping[str, Feature] = self.schema
        for i, part in enumerate(parts):
            feature = members.get(part)
            if feature is None:
                return {}
            if isinstance(feature, Group):
                members = feature.features
                continue
            kwargs = dict(getattr(feature, "__ds_kwargs__", {}) or {})
            for key in parts[i + 1 :]:
                if isinstance(kwargs.get(key), dict):
                    kwargs = dict(kwargs[key])
            return {k: v for k, v in kwargs.items() if not isinstance(v, dict)}
        return {}

    def _init_schema(self, f: h5py.File) -> None:
        """Create the declared groups and store every feature's ``attrs``."""
        init_schema(f, self.schema)
        self._invalidate()

    def _init_feature_group(self, f: h5py.File, path: str) -> None:
        """Store the attrs of the schema feature owning ``path`` if its group is new."""
        owner = _owner_path(self.schema, path)
        if owner and owner not in f:
            fmt.write_attrs(f.require_group(owner), self._schema_node(owner).attrs)

    # -- display -----------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self.filename!r} mode={self.mode!r}>"

    def info(self) -> None:
        """Print the file's 2-D table: features down, ids across."""
        print(text_table(self))

    def _repr_html_(self) -> str:
        return html_table(self)

    def to_dask(self) -> dict[str, Any]:
        """Every feature holding data as a dask array, in a nested dict by group.

        Examples
        --------
        >>> arrays = file.to_dask()  # doctest: +SKIP
        >>> arrays["data"]["images"].mean().compute()  # doctest: +SKIP
        """
        from .lazy import file_to_dask

        return file_to_dask(self)

    # -- errors recorded by create(on_error="skip") ---------------------------------------------

    @property
    def errors(self) -> list[Failure]:
        """Failures recorded by ``create(..., on_error="skip")``, oldest first."""
        self._commit()
        with self._handle.open() as f:
            return read_failures(f, self.allow_external)


def _version(filename: str, h5_kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """What tells one state of the file from another: its ``stat`` identity, size and times."""
    if h5_kwargs.get("driver") == "core" and not h5_kwargs.get("backing_store", True):
        return None  # in memory: no other process sees it
    try:
        st = os.stat(filename)
    except OSError:  # no file to stat: None equals no cached version, so the next
        return None  # read drops the cached tables and its open says what is wrong
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_file(
    filename: str, mode: str, schema: Mapping[str, Feature], h5_kwargs: dict[str, Any]
) -> h5py.File:
    """Open ``filename`` for writing in an h5py ``mode`` ("w", "a", "r+", "x"...), labelled
    as a typed file with the groups and attrs of ``schema``: what a new TypedFile does.

    Raises
    ------
    FileFormatError
        The file is not HDF5, is being written by another process, or is of a newer version.
    """
    h5_kwargs = without_chunk_cache(h5_kwargs)

    def label(f: h5py.File) -> None:
        fmt.init_root(f)
        init_schema(f, schema)

    if creates_file(filename, mode, h5_kwargs):  # a kill leaves the old file or the new one
        create_atomically(filename, mode, label, **h5_kwargs)
        return open_h5(filename, "r+", **h5_kwargs)
    f = open_h5(filename, mode, **h5_kwargs)
    try:
        fmt.check_root(f)  # never relabel a file of a newer version
        if legacy.is_h5mapper(f):  # nor one of h5mapper
            raise FileFormatError(_legacy_message(filename))
        if h5_kwargs.get("driver") not in (None, "sec2"):
            label(f)  # in memory, or laid out by its driver: written as it is
            return f
    except BaseException:
        f.close()
        raise
    f.close()
    with FileHandle(filename, "r+", **h5_kwargs).open(write=True) as f:
        label(f)  # journaled where it can be, as a commit is: a kill never damages the file
    return open_h5(filename, "r+", **h5_kwargs)


def init_schema(f: h5py.File, schema: Mapping[str, Feature]) -> None:
    """Create the groups of ``schema`` in ``f`` and store every feature's ``attrs``."""
    for path, feature in _walk(schema):
        group = f.require_group(path)
        if feature.attrs:
            fmt.write_attrs(group, feature.attrs)


def _flat_arrays(data: Any) -> dict[str, np.ndarray] | None:
    """``data`` itself when it is already a flat dict of storable arrays (the fast path of add;
    :func:`~h5dask.extract.normalize` says why others are not)."""
    if type(data) is not dict:
        return None
    for key, value in data.items():
        if (
            type(value) is not np.ndarray
            or not value.ndim
            or value.dtype.kind in "OV"
            or fmt.rows_problem(value)
            or type(key) is not str
            or not key
            or "/" in key
        ):
            return None
    return data


def _legacy_message(filename: str) -> str:
    return (
        f"{filename!r} was written by h5mapper: h5dask reads it read-only (mode 'r'); "
        f"to write to it, convert it first: `h5dask convert {filename} NEW.h5`"
    )


def _check_unique(index: IdIndex, filename: str) -> None:
    """Refuse an id table that holds an id twice: ids are keys."""
    keys = index._sorted
    twice = np.flatnonzero(keys[1:] == keys[:-1])
    if len(twice):
        id = keys[twice[0]].decode("utf-8", "replace")
        raise FileFormatError(f"{filename!r}: id {id!r} appears more than once in /{fmt.IDS}")


def _check_schema(schema: Mapping[str, Any], cls: type[TypedFile]) -> dict[str, Feature]:
    """Check a ``schema=`` dict of features for a file of ``cls``."""
    for name, feature in schema.items():
        if not isinstance(feature, Feature):
            raise SchemaError(f"schema entry {name!r} is a {type(feature).__name__}, not a Feature")
        problem = "is reserved" if name in fmt.RESERVED else name_problem(name)
        if problem:
            raise SchemaError(f"{name!r} cannot name a feature: it {problem}")
    _check_names(cls, schema)
    for name, feature in schema.items():
        feature.name = feature.name or name
    return dict(schema)


_INSTANCE_API = ("filename", "schema")  # set by TypedFile.__init__
_GROUP_API = frozenset(n for n in dir(GroupProxy) if not n.startswith("_")) | {
    "file",
    "path",
    "feature",
}


def _check_names(cls: type, schema: Mapping[str, Feature], path: str = "") -> None:
    """Refuse names that would hide an attribute: of ``cls`` at the top level (``index``,
    ``keys``...), of the group proxy in a Group (``get``, ``name``...)."""
    for name, feature in schema.items():
        if path and name in _GROUP_API:
            raise SchemaError(
                f"{cls.__qualname__}: Group member {path}/{name} would hide the group's "
                f"attribute {name!r} (file.{path.replace('/', '.')}.{name}); rename the member"
            )
        owner = None if path else _api_owner(cls, name)
        if owner:
            raise SchemaError(
                f"{cls.__qualname__}: a feature named {name!r} would hide {owner}.{name}; "
                "rename the feature"
            )
        if isinstance(feature, Group):
            _check_names(cls, feature.features, f"{path}/{name}" if path else name)


def _api_owner(cls: type, name: str) -> str | None:
    """The class of ``cls``'s MRO whose public attribute ``name`` is, if any."""
    if name.startswith("_"):
        return None
    if name in _INSTANCE_API:
        return "TypedFile"
    for klass in cls.__mro__:
        if name in vars(klass) and not isinstance(vars(klass)[name], Feature):
            return klass.__qualname__
    return None


def check_storable(schema: Mapping[str, Feature]) -> None:
    """Refuse features whose ``__ds_kwargs__`` no dataset can be created with (an unknown
    compression filter or keyword) or whose ``attrs`` cannot be stored: checked before a
    file is written and before any ``load`` runs, as these fail whatever the sources.

    Raises
    ------
    SchemaError
        Naming the feature and the cause.
    """
    for path, feature in _walk(schema):
        problem = _kwargs_problem(getattr(feature, "__ds_kwargs__", None) or {})
        if problem:
            raise SchemaError(f"feature {path!r}: __ds_kwargs__: {problem}")
        problem = fmt.attrs_problem(feature.attrs)
        if problem:
            raise SchemaError(f"feature {path!r}: {problem}")


def _kwargs_problem(ds_kwargs: Mapping[str, Any], where: str = "") -> str | None:
    """:func:`format.ds_kwargs_problem` of ``ds_kwargs`` and of those it holds for the keys
    of a dict that ``load`` returns (see :meth:`TypedFile._ds_kwargs`)."""
    flat = {k: v for k, v in ds_kwargs.items() if not isinstance(v, dict)}
    problem = fmt.ds_kwargs_problem(flat)
    if problem:
        return f"{where}{problem}"
    for key, nested in ds_kwargs.items():
        if isinstance(nested, dict):
            problem = _kwargs_problem(nested, f"{where}[{key!r}] ")
            if problem:
                return problem
    return None


def _walk(schema: Mapping[str, Feature], prefix: str = ""):
    for name, feature in schema.items():
        path = prefix + name
        yield path, feature
        if isinstance(feature, Group):
            yield from _walk(feature.features, path + "/")


def _owner_path(schema: Mapping[str, Feature], path: str) -> str:
    """Path of the schema feature that owns ``path`` (itself, or a dict-returning parent)."""
    members, owner = schema, []
    for part in path.split("/"):
        feature = members.get(part)
        if feature is None:
            break
        owner.append(part)
        if not isinstance(feature, Group):
            break
        members = feature.features
    return "/".join(owner)


@atexit.register
def _flush_all() -> None:
    for file in list(_WRITING):
        try:
            file.flush()
        except Exception as exc:  # reported, never raised at exit
            print(f"h5dask: could not commit buffered writes to {file.filename!r}: {exc}")
