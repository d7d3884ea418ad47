"""Crash safety of writes: an undo journal around each commit, and ``repair``.

HDF5 updates its metadata in place and in no particular order, so a writer
killed in the middle of a flush can leave a file that opens but holds
dangling addresses (reads fail, later writes crash the interpreter). h5dask
keeps the file closed and consistent between commits, and wraps each commit
in an undo journal, ``FILE.h5dask-journal``, as a database's rollback journal:

1. the journal is created locked, bound to the file (its device, inode and
   length), and linked at its path only then, so no process ever sees it
   unlocked while its writer lives;
2. while HDF5 writes, the old content of every page that existed when the
   commit began is appended to the journal, and HDF5's new content of such
   pages is held in memory (appends past the old end go to the file at once);
3. at the end, the journal is synced to disk, the held pages are written to
   the file, the file is synced, and the journal is deleted (and its folder
   synced): that is the commit.

If the writer dies (or the machine loses power), the journal survives, and
:func:`repair` checks that it belongs to the file as it is, writes the old
pages back and cuts the file to its old length, restoring the file as it was
after the last commit. ``docs/RELIABILITY.md`` describes the guarantees.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import stat
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import h5py

from .errors import FileFormatError, ReadOnlyError

__all__ = [
    "repair",
    "journal_path",
    "journaled",
    "uses_locks",
    "needs_repair",
    "durable",
    "JOURNAL_SUFFIX",
    "JournalError",
]

log = logging.getLogger("h5dask")

JOURNAL_SUFFIX = ".h5dask-journal"
PAGE = 4096
LOCK_WAIT = 10.0
HELD_BYTES = 64 << 20  # of new page contents held in memory before they are written early
MAGIC = b"H5DJRNL2"
HEADER = struct.Struct("<8sQQQI")  # magic, file length before the commit, device, inode, crc
RECORD = struct.Struct("<QII")  # offset, length, crc of the data
WRITING = 2**64 - 1  # the offset of a record listing the pages about to be written
PAGE_CRC = struct.Struct("<QI")  # in a WRITING record: a page's offset, crc of its new content
FORGOTTEN = 2**64 - 2  # the offset of a record of a range written unsaved (JournaledFile.forget)
RANGE = struct.Struct("<QQ")  # in a FORGOTTEN record: start, stop
NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT})
OPEN_JOURNAL = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


class JournalError(FileFormatError):
    """A journal that h5dask refuses to replay: it does not belong to the file as it is."""


def journal_path(filename: str | os.PathLike) -> str:
    """The undo journal of ``filename``: it exists only while a commit is unfinished."""
    return os.fspath(filename) + JOURNAL_SUFFIX


def needs_repair(filename: str | os.PathLike) -> bool:
    """Whether a writer died in the middle of a commit to ``filename`` (or is committing now)."""
    return os.path.lexists(journal_path(filename))


def durable() -> bool:
    """Whether commits are synced to disk: dask config ``h5dask.durable``, default True.

    Off (``dask.config.set({"h5dask.durable": False})``, or the environment
    variable ``DASK_H5DASK__DURABLE=False``), a commit skips its ``fsync``
    calls: it survives the death of its process, not a power loss or a
    kernel crash (docs/RELIABILITY.md, "Durability", has the figures).
    """
    import dask.config  # here: `import h5dask` loads no dask, and a read never asks

    return str(dask.config.get("h5dask.durable", True)).lower() not in ("false", "0", "no")


def repair(filename: str | os.PathLike, to: str | os.PathLike | None = None) -> bool:
    """Undo the unfinished commit of a writer that died; return whether there was one.

    The file is restored byte for byte to its state after its last commit (but
    for space past the last rows that no read sees, see :meth:`JournaledFile.forget`):
    every source committed before the crash is kept, and
    ``TypedFile.create(filename, sources, mode="a")`` resumes the build.

    Before writing anything, the journal is checked to belong to the file as
    it is: the same device and inode, no shorter than before the commit but
    where the journal saved what was cut, and each saved page holding either
    its content before the commit or what the writer wrote there. One repair
    runs at a time (it locks the journal), and a repair that finds the journal
    gone or replaced once it holds the lock does nothing.

    Parameters
    ----------
    filename : str or os.PathLike
        The file to repair.
    to : str or os.PathLike, optional
        Write the repaired file there instead, leaving ``filename`` and its
        journal untouched: for a file on read-only media.

    Raises
    ------
    FileFormatError
        A live process is writing the file (on file systems with locks: elsewhere,
        make sure none is), or the journal is not an h5dask journal.
    JournalError
        The journal does not belong to the file as it is (written for another
        file, or the file was restored from a backup since its writer died).

    Examples
    --------
    >>> from h5dask.repair import repair
    >>> repair("experiment.h5")  # doctest: +SKIP
    False
    """
    filename = os.fspath(filename)
    path = journal_path(filename)
    fd = _open_journal(path)
    if fd is None:
        if to is not None:
            shutil.copyfile(filename, to)
        return False
    try:
        _lock(fd, filename)
        if not still_linked(fd, path):
            return False  # another repair, or the commit itself, ended it meanwhile
        journal = _read_journal(fd, path)
        with open(filename, "rb" if to is not None else "r+b", buffering=0) as f:
            journal.check(filename, f.fileno(), os.fstat(fd))
            if to is not None:
                shutil.copyfile(filename, to)
                with open(to, "r+b", buffering=0) as out:
                    journal.undo(out.fileno())
                return True
            journal.undo(f.fileno())
        os.unlink(path)
        fsync_folder(path)
    finally:
        os.close(fd)
    return True


def discard(filename: str | os.PathLike, why: str) -> bool:
    """Delete the journal of a dead writer without replaying it (the file is being
    replaced whole, so nothing of it is needed); return whether there was one."""
    path = journal_path(filename)
    fd = _open_journal(path)
    if fd is None:
        return False
    try:
        _lock(fd, os.fspath(filename))
        if not still_linked(fd, path):
            return False
        os.unlink(path)
        fsync_folder(path)
    finally:
        os.close(fd)
    log.warning(
        "%s: deleted the journal of a writer that died, without replaying it: %s", path, why
    )
    return True


def _open_journal(path: str) -> int | None:
    """The journal at ``path`` opened (never through a symlink), or None if there is none."""
    try:
        fd = os.open(path, OPEN_JOURNAL)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JournalError(
                f"{path!r} is a symbolic link, not a journal h5dask wrote: remove it"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise JournalError(f"{path!r} is not a regular file, not a journal h5dask wrote")
    return fd


def still_linked(fd: int, path: str) -> bool:
    """Whether the open journal ``fd`` is still the file linked at ``path``."""
    st = os.fstat(fd)
    try:
        linked = os.lstat(path)
    except FileNotFoundError:
        return False
    return st.st_nlink > 0 and (linked.st_dev, linked.st_ino) == (st.st_dev, st.st_ino)


def fsync_folder(path: str) -> None:
    """Sync the folder holding ``path``: a file it created or deleted is then on disk."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def _crc(data: Any, offset: int) -> int:
    return zlib.crc32(data, offset & 0xFFFFFFFF)


@dataclass
class Journal:
    """What a journal holds: the file it was written for and the pages the commit saved.

    ``written`` maps the offset of a page to the crcs of the contents the
    writer was about to write there (it may have written some of them);
    ``forgotten`` lists the ranges it wrote without saving them first.
    """

    path: str
    size: int = 0
    device: int = -1
    inode: int = -1
    records: list[tuple[int, bytes]] = field(default_factory=list)
    written: dict[int, set[int]] = field(default_factory=dict)
    forgotten: list[tuple[int, int]] = field(default_factory=list)

    def check(self, filename: str, fd: int, journal_stat: os.stat_result) -> None:
        """Raise :class:`JournalError` unless this journal belongs to the file open as ``fd``."""
        if self.inode < 0:
            return  # died before its header was on disk: the file was not changed yet
        st = os.fstat(fd)
        if journal_stat.st_uid not in (st.st_uid, os.geteuid()):
            self._refuse(
                filename, f"it belongs to user {journal_stat.st_uid}, the file to {st.st_uid}"
            )
        if (st.st_dev, st.st_ino) != (self.device, self.inode):
            self._refuse(
                filename,
                f"it was written for another file (device {self.device}, inode {self.inode}; "
                f"this one is device {st.st_dev}, inode {st.st_ino}): the file was replaced",
            )
        saved = {
            offset // PAGE + k
            for offset, data in self.records
            for k in range(-(-len(data) // PAGE))
        }
        if st.st_size < self.size and not all(
            p in saved for p in range(st.st_size // PAGE, -(-self.size // PAGE))
        ):
            self._refuse(
                filename,
                f"the file is shorter ({st.st_size} bytes) than before the commit "
                f"({self.size}): it was replaced or restored from a backup since",
            )
        for offset, data in self.records:
            now = os.pread(fd, len(data), offset)
            for lo in range(0, len(now), PAGE):
                page = now[lo : lo + PAGE]
                if page != data[lo : lo + len(page)] and zlib.crc32(page) not in self.written.get(
                    offset + lo, ()
                ):
                    self._refuse(
                        filename,
                        f"its page at offset {offset + lo} holds neither its content before the "
                        "commit nor what the writer wrote there: the file was changed since "
                        "(restored from a backup?)",
                    )

    def _refuse(self, filename: str, cause: str) -> None:
        raise JournalError(
            f"{self.path!r} does not belong to {filename!r} as it is now: {cause}. h5dask "
            "changed nothing; if the file is right as it is, delete the journal"
        )

    def undo(self, fd: int) -> None:
        """Write the saved pages back into ``fd``, cut it to its old length, sync, verify.

        Forgotten ranges are zeroed first (a saved page among them is then written
        back): they held nothing of the last commit, but a dead commit's rows there
        would be garbage heap references in a string table, which HDF5 follows when
        the next append overwrites them; zeros are empty strings, and numbers there
        are never read.
        """
        if self.inode < 0:
            return
        for start, stop in self.forgotten:
            _pwrite_all(fd, bytes(min(stop, self.size) - start), start)
        for offset, data in self.records:
            _pwrite_all(fd, data, offset)
        os.ftruncate(fd, self.size)
        os.fsync(fd)
        for offset, data in self.records:
            if os.pread(fd, len(data), offset) != data:
                raise FileFormatError(
                    f"repairing {self.path!r}: the page at offset {offset} does not read back "
                    "as written (a failing disk?)"
                )


def _read_journal(fd: int, path: str) -> Journal:
    """The journal open as ``fd``; a torn last record is dropped (its pages were not
    overwritten yet: the file is written only after the journal is synced)."""
    journal = Journal(path)
    with os.fdopen(os.dup(fd), "rb") as j:
        header = j.read(HEADER.size)
        if len(header) < HEADER.size or not header.strip(b"\0"):
            journal.size = -1  # its header never reached the disk: nor did any change
            return journal
        magic, journal.size, journal.device, journal.inode, crc = HEADER.unpack(header)
        if magic != MAGIC or zlib.crc32(header[:-4]) != crc:
            raise FileFormatError(f"{path!r} is not an h5dask journal (of this version)")
        while head := j.read(RECORD.size):
            if len(head) < RECORD.size:
                break
            offset, length, crc = RECORD.unpack(head)
            data = j.read(length)
            if len(data) < length or _crc(data, offset) != crc:
                break  # the record was being saved: what it covers was not overwritten yet
            if offset == FORGOTTEN:
                journal.forgotten.extend(RANGE.iter_unpack(data))
            elif offset == WRITING:
                for page, page_crc in PAGE_CRC.iter_unpack(data):
                    journal.written.setdefault(page, set()).add(page_crc)
            else:
                journal.records.append((offset, data))
    return journal


def _new_journal(path: str, header: bytes) -> int:
    """Create the journal at ``path`` holding ``header``, locked before it is linked
    there: a journal at its path always has its header (on disk once it is synced,
    before the file is overwritten).

    Linking never follows a symlink nor replaces a file: anything at ``path``
    makes it fail. Where the file system has no ``O_TMPFILE``, the journal is
    made under a unique name first.
    """
    folder = os.path.dirname(os.path.abspath(path))
    temp = None
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in NO_TMPFILE:
            raise
        temp = f"{path}.{uuid.uuid4().hex}"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        flock(fd, fcntl.LOCK_EX)
        _write_all(fd, header)
        if temp is not None:
            os.link(temp, path, follow_symlinks=False)
        else:
            proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.link(str(fd), path, src_dir_fd=proc, follow_symlinks=True)
            finally:
                os.close(proc)
    except BaseException:
        os.close(fd)
        raise
    finally:
        if temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
    return fd


_SYNCED: dict[tuple[int, int], tuple[int, int]] = {}  # (device, inode) -> (size, mtime) once
# this process synced a commit to it: unchanged since, the next commit need not sync it first


class JournaledFile:
    """A binary file that saves each page of its old content to a journal before changing it.

    Pages past the file's length at the start need no saving: :func:`repair`
    cuts them off. New content of old pages is held in memory until the
    journal is on disk (:meth:`close`, or past ``HELD_BYTES``). It is the file
    object h5py's ``fileobj`` driver writes to.
    """

    def __init__(self, filename: str, lock: bool = True, sync: bool = True):
        self.name = filename
        self.sync = sync
        self._fd = os.open(filename, os.O_RDWR | os.O_CLOEXEC)
        try:
            if lock:
                _lock_data(self._fd, filename)
            repair(filename)  # a writer that died before this one took the lock
            st = os.fstat(self._fd)
            self.size = st.st_size
            if sync and _SYNCED.get((st.st_dev, st.st_ino)) != (st.st_size, st.st_mtime_ns):
                os.fsync(self._fd)  # what the journal undoes to is on disk
            head = HEADER.pack(MAGIC, self.size, st.st_dev, st.st_ino, 0)[:-4]
            self._journal = self._create(head + struct.pack("<I", zlib.crc32(head)))
        except BaseException:
            os.close(self._fd)
            raise
        self._pos = 0
        self._saved: set[int] = set()
        self._held: dict[int, bytearray] = {}  # page -> its new content, old bytes only
        self._forgotten: set[int] = set()  # pages of forget() not written yet
        self._folder_synced = False

    def _create(self, header: bytes) -> int:
        path = journal_path(self.name)
        try:
            return _new_journal(path, header)
        except FileExistsError:
            raise JournalError(
                f"cannot write {self.name!r}: {path!r} appeared while h5dask checked it "
                "(another writer, without locks?) or is a symbolic link; nothing was written"
            ) from None
        except (PermissionError, OSError) as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise ReadOnlyError(
                f"cannot write {self.name!r}: its undo journal {path!r} cannot be created "
                f"({os.strerror(exc.errno)}); h5dask journals each commit beside the file, "
                "so it needs write access to the folder too"
            ) from None

    def _save(self, start: int, stop: int) -> None:
        """Journal the pages of ``[start, stop)`` not saved yet (a record per run of pages),
        and hold their content for the writes to come."""
        last = (min(stop, self.size) - 1) // PAGE
        pages = [p for p in range(start // PAGE, last + 1) if p not in self._saved]
        while pages:
            n = next((k for k in range(1, len(pages)) if pages[k] != pages[0] + k), len(pages))
            offset = pages[0] * PAGE
            data = os.pread(self._fd, min(n * PAGE, self.size - offset), offset)
            _write_all(self._journal, RECORD.pack(offset, len(data), _crc(data, offset)) + data)
            for k in range(n):
                self._held[pages[k]] = bytearray(data[k * PAGE : (k + 1) * PAGE])
            self._saved.update(pages[:n])
            del pages[:n]

    def forget(self, start: int, stop: int) -> None:
        """Declare that ``[start, stop)`` holds nothing of the last commit: its whole pages
        are overwritten without being saved first.

        For the space past the last row of a dataset's last chunk, allocated whole
        by an earlier commit: the next rows are written there, and saving the old
        bytes first would journal every byte they overwrite (20,000 adds of 1 KiB
        journaled 2.78 MB, 0.38 MB with it). The range is journaled (16 bytes), and
        :func:`repair` zeroes it. Pages of it that are written are held as the
        others (from zeros), so they reach the file after that record.
        """
        first, stop = -(-start // PAGE), min(stop, self.size) // PAGE
        if first >= stop:
            return
        span = RANGE.pack(first * PAGE, stop * PAGE)
        _write_all(self._journal, RECORD.pack(FORGOTTEN, len(span), _crc(span, FORGOTTEN)) + span)
        pages = set(range(first, stop)) - self._saved
        self._forgotten |= pages
        self._saved |= pages

    def _write_at(self, offset: int, view: memoryview) -> None:
        stop = offset + len(view)
        if offset < self.size:
            self._save(offset, stop)
            if self._forgotten:
                self._hold_forgotten(offset, stop)
        pos = offset
        while pos < stop:
            page = pos // PAGE
            held = self._held.get(page) if pos < self.size else None
            if held is not None:
                end = min(stop, page * PAGE + len(held))
                held[pos - page * PAGE : end - page * PAGE] = view[pos - offset : end - offset]
            else:  # a run of pages written in place: new, forgotten, or already synced
                end = pos
                while end < stop and (end >= self.size or end // PAGE not in self._held):
                    end = stop if end >= self.size else min(stop, (end // PAGE + 1) * PAGE)
                _pwrite_all(self._fd, view[pos - offset : end - offset], pos)
            pos = end
        if len(self._held) * PAGE > HELD_BYTES:
            self._write_held()

    def _hold_forgotten(self, start: int, stop: int) -> None:
        for page in range(start // PAGE, (min(stop, self.size) - 1) // PAGE + 1):
            if page in self._forgotten:
                self._forgotten.discard(page)
                self._held[page] = bytearray(min(PAGE, self.size - page * PAGE))

    def _write_held(self) -> None:
        """Write the held pages into the file, once the journal saving their old content
        and the list of what is written are on disk."""
        if not self._held:
            return
        pages = sorted(self._held)
        listing = b"".join(PAGE_CRC.pack(p * PAGE, zlib.crc32(self._held[p])) for p in pages)
        _write_all(self._journal, RECORD.pack(WRITING, len(listing), _crc(listing, WRITING)))
        _write_all(self._journal, listing)
        if self.sync:
            os.fsync(self._journal)
            if not self._folder_synced:
                fsync_folder(journal_path(self.name))
                self._folder_synced = True
        while pages:
            n = next((k for k in range(1, len(pages)) if pages[k] != pages[0] + k), len(pages))
            data = b"".join(self._held[p] for p in pages[:n])
            _pwrite_all(self._fd, data, pages[0] * PAGE)
            del pages[:n]
        self._held.clear()

    # -- the file object protocol h5py uses ---------------------------------------------------

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, os.fstat(self._fd).st_size)[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = os.preadv(self._fd, [view], self._pos)
        if self._held and self._pos < self.size:
            self._read_held(view[:n], self._pos)
        self._pos += n
        return n

    def _read_held(self, view: memoryview, offset: int) -> None:
        """Lay the held new content of old pages over ``view``, read from ``offset``."""
        first, last = offset // PAGE, (offset + len(view) - 1) // PAGE
        pages = range(first, last + 1) if last - first < len(self._held) else sorted(self._held)
        for page in pages:
            held = self._held.get(page)
            if held is None or not first <= page <= last:
                continue
            lo, hi = max(offset, page * PAGE), min(offset + len(view), page * PAGE + len(held))
            view[lo - offset : hi - offset] = held[lo - page * PAGE : hi - page * PAGE]

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = max(0, os.fstat(self._fd).st_size - self._pos)
        buffer = bytearray(n)
        return bytes(buffer[: self.readinto(buffer)])

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._write_at(self._pos, view)
        self._pos += len(view)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if size < self.size:
            self._save(size, self.size)
            self._write_held()  # the cut pages are on disk in the journal first
        os.ftruncate(self._fd, size)
        return size

    def flush(self) -> None:
        """Nothing: the held pages wait for the commit (:meth:`close`)."""

    def close(self) -> None:
        """Write the held pages, sync the file, then delete the journal: the commit."""
        self._write_held()
        if self.sync:
            os.fsync(self._fd)
            st = os.fstat(self._fd)
            _SYNCED[st.st_dev, st.st_ino] = (st.st_size, st.st_mtime_ns)
        os.unlink(journal_path(self.name))
        if self.sync:
            fsync_folder(journal_path(self.name))
        os.close(self._journal)  # its lock goes once it is unlinked: readers then see no commit
        os.close(self._fd)

    def abandon(self) -> None:
        """Close without committing: the journal stays for :func:`repair`."""
        os.close(self._journal)
        os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


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
    the file is as it was before it, whatever HDF5 managed to write. Ctrl-C
    (SIGINT) is held back until the commit is whole (:func:`interrupts_deferred`).
    """
    with interrupts_deferred():
        yield from _journaled(filename, h5_kwargs)


def _journaled(
    filename: str, h5_kwargs: dict[str, Any]
) -> Iterator[tuple[h5py.File, JournaledFile]]:
    kwargs = {k: v for k, v in h5_kwargs.items() if k not in ("driver", "locking")}
    # No chunk cache: appends write whole chunks straight from their arrays (see
    # format.append_blocks), and a cache that a commit's close frees would make
    # the next commit allocate and page in megabytes of fresh chunk buffers again.
    kwargs.setdefault("rdcc_nbytes", 0)
    raw = JournaledFile(filename, lock=uses_locks(h5_kwargs), sync=durable())
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


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) in this block, then raise ``KeyboardInterrupt`` after it.

    A ``KeyboardInterrupt`` raised inside HDF5's write callback reaches the
    writer as HDF5's "driver write request failed", and the commit fails; held
    back, the commit finishes and the interrupt follows it. Only in the main
    thread, and only where Python's own handler is installed.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _undo(f: h5py.File, raw: JournaledFile, filename: str) -> None:
    """Restore the file from the journal of a commit that failed part of the way."""
    try:
        f.close()
    except Exception:  # noqa: S110 - what HDF5 could not write is undone below
        pass
    finally:
        raw.abandon()
        repair(filename)
