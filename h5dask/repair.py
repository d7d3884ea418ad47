"""Crash safety of writes: an undo journal around each commit, and ``repair``.

HDF5 updates its metadata in place and in no particular order, so a writer
killed in the middle of a flush can leave a file that opens but holds
dangling addresses (reads fail, later writes crash the interpreter). h5dask
keeps the file closed and consistent between commits, and wraps each commit
in an undo journal: before HDF5 overwrites a byte that existed when the
commit began, the old page is appended to ``FILE.h5dask-journal``. Once the
file is closed the journal is deleted: that is the commit. If the writer
dies, the journal survives, and :func:`repair` writes the old pages back and
cuts the file to its old length, restoring the file as it was after the last
commit. ``docs/RELIABILITY.md`` describes the guarantees.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import h5py

from .errors import FileFormatError

__all__ = ["repair", "journal_path", "journaled", "needs_repair", "uses_locks", "JOURNAL_SUFFIX"]

JOURNAL_SUFFIX = ".h5dask-journal"
PAGE = 4096
LOCK_WAIT = 10.0
MAGIC = b"H5DJRNL1"
HEADER = struct.Struct("<8sQI")  # magic, length of the file before the commit, crc
RECORD = struct.Struct("<QII")  # offset, length, crc of the data
NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


def journal_path(filename: str | os.PathLike) -> str:
    """The undo journal of ``filename``: it exists only while a commit is unfinished."""
    return os.fspath(filename) + JOURNAL_SUFFIX


def needs_repair(filename: str | os.PathLike) -> bool:
    """Whether a writer died in the middle of a commit to ``filename`` (or is committing now)."""
    return os.path.exists(journal_path(filename))


def repair(filename: str | os.PathLike) -> bool:
    """Undo the unfinished commit of a writer that died; return whether there was one.

    The file is restored byte for byte to its state after its last commit (but
    for space past the last rows that no read sees, see :meth:`JournaledFile.forget`):
    every source committed before the crash is kept, and
    ``TypedFile.create(filename, sources, mode="a")`` resumes the build.

    Raises
    ------
    FileFormatError
        A live process is writing the file (on file systems with locks: elsewhere,
        make sure none is), or the journal is not an h5dask journal.

    Examples
    --------
    >>> from h5dask.repair import repair
    >>> repair("experiment.h5")  # doctest: +SKIP
    False
    """
    path = journal_path(filename)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        _lock(fd, filename)
        size, records = _read_journal(fd, filename)
        with open(filename, "r+b") as f:
            for offset, data in records:
                f.seek(offset)
                f.write(data)
            f.truncate(size)
        os.unlink(path)
    finally:
        os.close(fd)
    return True


def flock(fd: int, operation: int) -> bool:
    """``fcntl.flock(fd, operation)``, or False where the file system has no locks.

    NFS without its lock daemon and Lustre mounted without ``flock`` refuse
    locks; h5dask then goes on unlocked, as HDF5 does with locking off (one
    process must write a file at a time). A lock that another process holds
    raises :class:`BlockingIOError` (with ``LOCK_NB``).
    """
    try:
        fcntl.flock(fd, operation)
    except OSError as exc:
        if exc.errno not in NO_LOCKS:
            raise
        return False
    return True


def _lock(fd: int, filename: str | os.PathLike) -> None:
    try:
        flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FileFormatError(
            f"{os.fspath(filename)!r} is being written by another process (its journal is locked)"
        ) from None


def _read_journal(fd: int, filename: str | os.PathLike) -> tuple[int, list[tuple[int, bytes]]]:
    """The file length before the commit and the saved pages; a torn last record is dropped."""
    with os.fdopen(os.dup(fd), "rb") as j:
        header = j.read(HEADER.size)
        if len(header) < HEADER.size:  # died before the header was written: nothing changed yet
            return os.path.getsize(filename), []
        magic, size, crc = HEADER.unpack(header)
        if magic != MAGIC or zlib.crc32(header[:16]) != crc:
            raise FileFormatError(f"{journal_path(filename)!r} is not an h5dask journal")
        records = []
        while head := j.read(RECORD.size):
            if len(head) < RECORD.size:
                break
            offset, length, crc = RECORD.unpack(head)
            data = j.read(length)
            if len(data) < length or zlib.crc32(data, offset) != crc:
                break  # the page was being saved: it was not overwritten yet
            records.append((offset, data))
    return size, records


class JournaledFile:
    """A binary file that saves each page of its old content to a journal before changing it.

    Pages past the file's length at the start need no saving: :func:`repair`
    cuts them off. It is the file object h5py's ``fileobj`` driver writes to.
    """

    def __init__(self, filename: str, lock: bool = True):
        self.name = filename
        self._f = open(filename, "r+b", buffering=0)  # noqa: SIM115 - closed by close()
        if lock:
            _lock_data(self._f.fileno(), filename)
        # locked before it is in place: a reader never sees it unlocked, as a dead writer's
        fresh = journal_path(filename) + ".new"
        self._journal = os.open(fresh, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        flock(self._journal, fcntl.LOCK_EX)
        os.replace(fresh, journal_path(filename))
        self.size = os.fstat(self._f.fileno()).st_size
        head = HEADER.pack(MAGIC, self.size, 0)[:16]
        os.write(self._journal, head + struct.pack("<I", zlib.crc32(head)))
        self._saved: set[int] = set()

    def _save(self, start: int, stop: int) -> None:
        """Journal the pages of ``[start, stop)`` not saved yet: a record per run of pages."""
        last = (min(stop, self.size) - 1) // PAGE
        pages = [p for p in range(start // PAGE, last + 1) if p not in self._saved]
        while pages:
            n = next((k for k in range(1, len(pages)) if pages[k] != pages[0] + k), len(pages))
            offset = pages[0] * PAGE
            data = os.pread(self._f.fileno(), min(n * PAGE, self.size - offset), offset)
            _write_all(self._journal, RECORD.pack(offset, len(data), zlib.crc32(data, offset)))
            _write_all(self._journal, data)
            self._saved.update(pages[:n])
            del pages[:n]

    def forget(self, start: int, stop: int) -> None:
        """Declare that ``[start, stop)`` holds nothing of the last commit: its whole pages
        are overwritten without being saved first.

        For the space past the last row of a dataset's last chunk, allocated whole
        by an earlier commit: the next rows are written there, and saving the old
        bytes first would journal every byte they overwrite (20,000 adds of 1 KiB
        journaled 2.78 MB, 0.38 MB with it).
        """
        self._saved.update(range(-(-start // PAGE), stop // PAGE))

    # -- the file object protocol h5py uses ---------------------------------------------------

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer: Any) -> int:
        return self._f.readinto(buffer)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)

    def write(self, data: Any) -> int:
        start = self._f.tell()
        if start < self.size:
            self._save(start, start + memoryview(data).nbytes)
        return self._f.write(data)

    def truncate(self, size: int | None = None) -> int:
        size = self._f.tell() if size is None else size
        if size < self.size:
            self._save(size, self.size)
        return self._f.truncate(size)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        """Close the file, then delete the journal: the commit."""
        self._f.close()
        os.unlink(journal_path(self.name))
        os.close(self._journal)

    def abandon(self) -> None:
        """Close without committing: the journal stays for :func:`repair`."""
        self._f.close()
        os.close(self._journal)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _lock_data(fd: int, filename: str) -> None:
    """Lock the file as HDF5 does, waiting a little for readers to let go of it."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise FileFormatError(
                    f"cannot write {filename!r}: another process has kept it open for "
                    f"{LOCK_WAIT:.0f} s (unable to lock file)"
                ) from None
            time.sleep(0.01)


def can_journal(filename: Any, h5_kwargs: dict[str, Any]) -> bool:
    """Whether writes to ``filename`` with these options can go through a journal."""
    return (
        isinstance(filename, (str, os.PathLike))
        and h5_kwargs.get("driver") in (None, "sec2")
        and os.path.isfile(filename)
    )


def uses_locks(h5_kwargs: dict[str, Any]) -> bool:
    """Whether files opened with these h5py options are locked (``locking=``, or
    ``HDF5_USE_FILE_LOCKING`` in the environment), as HDF5 decides."""
    if "locking" in h5_kwargs:
        return h5_kwargs["locking"] not in (False, "false")
    return os.environ.get("HDF5_USE_FILE_LOCKING", "TRUE").upper() not in ("FALSE", "0")


@contextmanager
def journaled(filename: str, **h5_kwargs: Any) -> Iterator[tuple[h5py.File, JournaledFile]]:
    """Open ``filename`` for writing inside one journaled commit; commit on a clean exit.

    Yields the open file and its journaled file object.

    An unfinished commit left by a dead writer is undone first (:func:`repair`).
    If the body or closing the file raises (a full disk, a write the file system
    refuses), the commit is undone from the journal as a dead writer's would be:
    the file is as it was before it, whatever HDF5 managed to write.
    """
    repair(filename)
    kwargs = {k: v for k, v in h5_kwargs.items() if k not in ("driver", "locking")}
    # No chunk cache: appends write whole chunks straight from their arrays (see
    # format.append_blocks), and a cache that a commit's close frees would make
    # the next commit allocate and page in megabytes of fresh chunk buffers again.
    kwargs.setdefault("rdcc_nbytes", 0)
    raw = JournaledFile(filename, lock=uses_locks(h5_kwargs))
    try:
        f = h5py.File(raw, "r+", **kwargs)
    except BaseException:
        raw.close()
        raise
    try:
        yield f, raw
        f.close()
    except BaseException:
        _undo(f, raw, filename)
        raise
    raw.close()


def _undo(f: h5py.File, raw: JournaledFile, filename: str) -> None:
    """Restore the file from the journal of a commit that failed part of the way."""
    try:
        f.close()
    except Exception:  # noqa: S110 - what HDF5 could not write is undone below
        pass
    finally:
        raw.abandon()
        repair(filename)
