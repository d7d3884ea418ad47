"""Opening HDF5 files per process: the handle layer under typed files and dask tasks.

h5py objects neither pickle nor survive ``fork``. A :class:`FileHandle` keeps
the path and options instead of an open file; it opens the file on demand, in
the process that asks, and keeps it open between calls only when told to.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import h5py

from . import format as fmt
from .errors import FileFormatError, ReadOnlyError
from .repair import (
    JournaledFile,
    can_journal,
    discard,
    durable,
    journaled,
    needs_repair,
    repair,
    still_linked,
)

log = logging.getLogger("h5dask")

__all__ = ["FileHandle", "open_h5", "create_atomically", "creates_file"]


class _Forks:
    """How many forks this process descends from: handles and writers serve one process.

    Cheaper to compare than ``os.getpid()``, a system call, on every read.
    """

    count = 0


def _after_fork() -> None:
    _Forks.count += 1


os.register_at_fork(after_in_child=_after_fork)


def forks() -> int:
    """The fork count of this process (see :class:`_Forks`)."""
    return _Forks.count


def open_h5(filename: str, mode: str = "r", **h5_kwargs: Any) -> h5py.File:
    """Open an HDF5 file with errors that say what is wrong with it.

    Raises
    ------
    FileNotFoundError
        ``filename`` does not exist (modes ``r`` and ``r+``).
    FileFormatError
        ``filename`` exists but is not an HDF5 file, cannot be opened, is being
        written by another process, or holds the unfinished commit of a writer
        that died and cannot be undone here (the file is read-only: ``h5dask
        repair FILE --to COPY`` repairs a copy). Elsewhere the open undoes such
        a commit first, with a warning.
    """
    on_disk = h5_kwargs.get("driver") != "core"
    if mode in ("r", "r+") and on_disk and not os.path.exists(filename):
        raise FileNotFoundError(f"no such file: {filename!r}")
    if on_disk and isinstance(filename, (str, os.PathLike)) and needs_repair(filename):
        _finish_interrupted_commit(os.fspath(filename), mode)
    if mode == "w" and on_disk and os.path.exists(filename):
        _refuse_if_locked(filename, h5_kwargs)  # HDF5 truncates before it tries the lock
    try:
        return h5py.File(filename, mode, **h5_kwargs)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if "signature" in str(exc):
            raise FileFormatError(f"{filename!r} is not an HDF5 file") from exc
        if "unable to lock file" in str(exc):
            raise FileFormatError(_locked_message(filename, mode)) from exc
        raise FileFormatError(f"cannot open {filename!r} in mode {mode!r}: {exc}") from exc


def creates_file(filename: str, mode: str, h5_kwargs: dict[str, Any]) -> bool:
    """Whether opening ``filename`` in h5py ``mode`` makes a new file on disk.

    Examples
    --------
    >>> creates_file("/no/such/file.h5", "a", {}), creates_file("/no/such/file.h5", "r+", {})
    (True, False)
    """
    if h5_kwargs.get("driver") not in (None, "sec2"):
        return False  # the core, family, ... drivers lay out their files themselves
    if mode == "w":
        return True
    return mode in ("a", "w-", "x") and not os.path.exists(filename)


def create_atomically(
    filename: str, mode: str, fill: Callable[[h5py.File], None], **h5_kwargs: Any
) -> None:
    """Make ``filename`` a new HDF5 file holding what ``fill`` writes, all at once.

    The file is written (and synced, if :func:`~h5dask.repair.durable`) under a
    temporary name in its folder, then renamed over ``filename`` (mode ``"w"``)
    or linked to it (other modes, which never replace a file): a process killed at
    any moment leaves the old file or the new one, never a truncated file that no
    longer opens. The caller holds the file's writer session, so a temporary file
    left by a killed writer is removed.

    Raises
    ------
    FileExistsError
        ``filename`` exists and ``mode`` is not ``"w"``.
    FileFormatError
        Another process holds ``filename`` open (mode ``"w"``).
    """
    if needs_repair(filename):  # a dead writer's journal: the new file needs none of it
        _finish_interrupted_commit(filename, "w")
    folder, name = os.path.split(os.path.abspath(filename))
    prefix, suffix = f".{name}.", ".h5dask-new"
    for left in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*" + suffix)):
        os.unlink(left)  # of a writer killed while creating: the caller's session excludes others
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    try:
        with h5py.File(tmp, "w", **h5_kwargs) as f:
            fill(f)
        sync = durable()
        if sync:
            _sync(tmp)
        if mode == "w":
            if os.path.exists(filename):
                _refuse_if_locked(filename, h5_kwargs)
                if needs_repair(filename):
                    repair(filename)  # the journal is the old file's; raises if it is live
            os.replace(tmp, filename)
        else:
            os.link(tmp, filename)  # FileExistsError rather than replace a file
        if sync:
            _sync(folder)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_if_locked(filename: str, h5_kwargs: dict[str, Any]) -> None:
    """Raise if another process holds ``filename`` open, before mode "w" truncates it."""
    try:
        h5py.File(filename, "r+", **h5_kwargs).close()
    except OSError as exc:
        if "unable to lock file" in str(exc):
            raise FileFormatError(_locked_message(filename, "w")) from exc


def _finish_interrupted_commit(filename: str, mode: str) -> None:
    """Undo a dead writer's unfinished commit before opening ``filename``, and say so.

    Mode ``"w"`` replaces the file whole, so its journal is deleted unreplayed
    (a warning says so). A reader repairs too, unless it cannot write the file
    or its folder (read-only media): it is then told how to repair a copy.
    """
    if mode == "w":
        discard(filename, "the file is created anew (mode 'w'), so none of it is needed")
        return
    if mode != "r":
        if repair(filename):  # raises if a live writer holds the journal
            _say_repaired(filename)
        return
    state = journal_state(filename)
    if state == "live":
        raise FileFormatError(
            f"cannot open {filename!r}: another process is committing a batch to it "
            "right now; retry in a moment"
        )
    if state == "dead":
        folder = os.path.dirname(os.path.abspath(filename))
        if not (os.access(filename, os.W_OK) and os.access(folder, os.W_OK)):
            raise FileFormatError(
                f"{filename!r} holds the unfinished commit of a writer that died, and this "
                "process cannot write the file or its folder (read-only media?) to undo it: "
                f"run `h5dask repair {filename} --to COPY.h5` and read the copy"
            )
        if repair(filename):
            _say_repaired(filename)
    if state == "unknown":
        raise FileFormatError(
            f"{filename!r} holds an unfinished commit: a process is committing to it, or died "
            "while committing (its file system has no locks to tell which). Retry in a "
            f"moment; if no process writes it, run `h5dask repair {filename}`"
        )


def _say_repaired(filename: str) -> None:
    log.warning(
        "%s: undid the unfinished commit of a writer that died (or was interrupted); "
        "the file holds its last commit",
        filename,
    )


def journal_state(filename: str) -> str:
    """The commit in progress on ``filename``, as its journal tells.

    ``"live"``: a writer holds the journal; ``"dead"``: the writer died
    mid-commit; ``"none"``: no commit is open (or the one seen ended meanwhile:
    a writer unlinks its journal, then lets go of its lock); ``"unknown"``: a
    commit is open, live or dead, on a file system without locks to tell.
    """
    import fcntl

    from .repair import OPEN_JOURNAL, flock, journal_path

    try:
        fd = os.open(journal_path(filename), OPEN_JOURNAL)
    except FileNotFoundError:
        return "none"
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symbolic link: dead, and repair refuses it by name
            return "dead"
        raise
    try:
        locked = flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return "live"
    else:
        if not still_linked(fd, journal_path(filename)):
            return "none"
        return "dead" if locked else "unknown"
    finally:
        os.close(fd)


def _locked_message(filename: str, mode: str) -> str:
    return (
        f"cannot open {filename!r} in mode {mode!r}: another process is writing it "
        "(unable to lock file). Wait until it finishes; to read what is committed anyway, "
        "open it read-only with locking=False (never for writing)"
    )


def _locks(h5_kwargs: dict[str, Any]) -> bool:
    """Whether HDF5 locks the file: then no other process commits to it while this one
    holds it open (not with ``locking=False`` or ``HDF5_USE_FILE_LOCKING=FALSE``)."""
    setting = h5_kwargs.get("locking")
    if setting is None:
        setting = os.environ.get("HDF5_USE_FILE_LOCKING", "TRUE")
    return str(setting).upper() not in ("FALSE", "0")


def as_reader(ds: h5py.Dataset) -> Any:
    """``ds``, or its ``asstr()`` view when it holds UTF-8 strings."""
    kind = h5py.check_string_dtype(ds.dtype)
    return ds.asstr() if kind is not None and kind.encoding == "utf-8" else ds


def without_chunk_cache(h5_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``h5_kwargs`` with HDF5's chunk cache off, unless they set its size.

    Without a cache, HDF5 reads a selection of an unfiltered chunk straight
    from the file; through one, it first copies the whole chunk: a random read
    of one 1 KiB item measured 5.4 us against 10.6 us from 64 KiB chunks and
    47.7 us from 1 MiB chunks. Filtered chunks read through a kept handle get
    a cache back (:meth:`FileHandle.reader`); writes append whole chunks
    straight from their arrays (see ``format.append_blocks``).
    """
    return h5_kwargs if "rdcc_nbytes" in h5_kwargs else {**h5_kwargs, "rdcc_nbytes": 0}


def _with_chunk_cache(f: h5py.File, path: str) -> h5py.Dataset:
    """The dataset ``f[path]`` opened with HDF5's default chunk cache."""
    _, nslots, nbytes, w0 = h5py.h5p.create(h5py.h5p.FILE_ACCESS).get_cache()
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(nslots, nbytes, w0)
    return h5py.Dataset(h5py.h5d.open(f.id, path.encode("utf-8"), dapl=dapl))


class FileHandle:
    """Opens one HDF5 file on demand, in whichever process uses it.

    Parameters
    ----------
    filename : str
        Path of the file.
    mode : {"r", "r+"}
        ``"r"`` refuses every write with :class:`~h5dask.errors.ReadOnlyError`.
    keep_open : bool
        Keep one handle open between calls (per process) instead of opening
        and closing the file around each call.
    allow_external : bool
        Let :meth:`reader` read datasets stored in other files
        (see :func:`h5dask.format.check_local`).
    **h5_kwargs
        Passed to :class:`h5py.File` (``driver``, ``locking``, ...).
    """

    def __init__(
        self,
        filename: str,
        mode: str,
        keep_open: bool = False,
        allow_external: bool = False,
        **h5_kwargs: Any,
    ):
        self.filename = filename
        self.mode = mode
        self.keep_open = keep_open
        self.allow_external = allow_external
        self.h5_kwargs = h5_kwargs
        self.locks = _locks(h5_kwargs)
        self._file: h5py.File | None = None
        self._forks = forks()
        self._readers: dict[str, tuple[h5py.File, Any]] = {}
        self._writing: h5py.File | None = None
        self._journal: JournaledFile | None = None

    @property
    def is_open(self) -> bool:
        """Whether this process holds an open handle."""
        return self._live() is not None

    def holds(self, f: h5py.File | None) -> bool:
        """Whether ``f`` is the handle this process keeps (a check cheaper than :attr:`kept`)."""
        return f is not None and f is self._file and self._forks == _Forks.count

    @property
    def writing(self) -> h5py.File | None:
        """The file this process is committing to through the journal, if it is."""
        return self._writing

    @contextmanager
    def open(self, write: bool = False) -> Iterator[h5py.File]:
        """Yield the open file; close it afterwards unless ``keep_open``."""
        if write and self.mode == "r":
            raise ReadOnlyError(f"{self.filename!r} is open read-only; open it with mode='r+'")
        if self.keep_open:
            with self._checked(write):
                yield self._cached(write)
            return
        if self._writing is not None:  # nested in a journaled write: the same file
            yield self._writing
            return
        if write and can_journal(self.filename, self.h5_kwargs):
            with journaled(self.filename, **self.h5_kwargs) as (f, raw):
                self._writing, self._journal = f, raw
                try:
                    yield f
                finally:
                    self._writing = self._journal = None
            return
        # reads take a shared lock only, so that many processes read at once
        with self._checked(write):
            f = open_h5(
                self.filename, self.mode if write else "r", **without_chunk_cache(self.h5_kwargs)
            )
            try:
                yield f
            finally:
                f.close()

    def _checked(self, write: bool) -> AbstractContextManager[None]:
        """Around a read: what h5py raises on a damaged file becomes a FileFormatError."""
        return nullcontext() if write else fmt.reading(self.filename)

    def forget(self, start: int, stop: int) -> None:
        """In a journaled write, the bytes ``[start, stop)`` of the file need no saving
        (see :meth:`JournaledFile.forget`); elsewhere, nothing is saved anyway."""
        if self._journal is not None:
            self._journal.forget(start, stop)

    def reader(self, path: str) -> Any:
        """The kept dataset at ``path`` (strings decoded), reused across calls.

        A dataset whose chunks are filtered (compressed) gets HDF5's default
        chunk cache, which the file is opened without: reusing the dataset
        keeps the cache warm, so small reads in a row decompress each chunk
        once. Only with ``keep_open``.
        """
        f = self._cached()
        kept = self._readers.get(path)
        if kept is None or kept[0] is not f:
            kept = self._readers[path] = (f, as_reader(self._dataset(f, path)))
        return kept[1]

    def _dataset(self, f: h5py.File, path: str) -> h5py.Dataset:
        ds = fmt.check_local(f[path], self.allow_external)
        if "rdcc_nbytes" in self.h5_kwargs or ds.chunks is None or not fmt.is_filtered(ds):
            return ds
        name = ds.name
        del ds  # HDF5 shares one cache between the handles of an open dataset: close it first
        return _with_chunk_cache(f, name)

    def close(self) -> None:
        """Close the kept handle of this process, if any."""
        f = self._live()
        self._file = None
        self._readers.clear()
        if f is not None:
            f.close()

    def _live(self) -> h5py.File | None:
        if self._forks != forks():  # inherited through fork: never touch it
            self._file, self._forks = None, forks()
            self._readers = {}
        if self._file is not None and not self._file.id.valid:
            self._file = None
        return self._file

    def _cached(self, write: bool = False) -> h5py.File:
        """The kept file, opened read-only until a write asks for more.

        A read-only open takes HDF5's shared lock only: a file kept open to
        be read, in any process, never stops another process from reading
        it (DataLoader workers of a ``keep_open`` dataset). Once this process
        writes, the kept file stays open for writing.
        """
        f = self._live()
        if f is not None and write and f.mode == "r":
            self.close()
            f = None
        if f is None:
            mode = self.mode if write else "r"
            f = self._file = open_h5(self.filename, mode, **without_chunk_cache(self.h5_kwargs))
        return f

    @property
    def kept(self) -> h5py.File | None:
        """This process's kept file, if one is open."""
        return self._live()

    @property
    def writable(self) -> bool:
        """Whether this process's kept file is open for writing."""
        f = self._live()
        return f is not None and f.mode != "r"

    def __getstate__(self) -> dict[str, Any]:
        if self.h5_kwargs.get("driver") == "core" and not self.h5_kwargs.get("backing_store", True):
            raise TypeError(f"{self.filename!r} lives in memory only and cannot be pickled")
        state = self.__dict__.copy()
        state["_file"] = None
        state["_readers"] = {}
        state["_writing"] = None
        return state

    def __repr__(self) -> str:
        return f"FileHandle({self.filename!r}, mode={self.mode!r}, keep_open={self.keep_open})"
