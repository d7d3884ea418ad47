"""One writer per file: the session that a ``create`` call or a writing TypedFile holds.

h5dask opens a file only around each commit, so HDF5's own lock covers one
commit: two builds of one file, or a build and an ``add``, could take turns
committing, each unaware of the ids the other wrote, and leave every id twice.
A writer therefore holds the file's *session* across all its commits: an
exclusive ``flock`` on ``FILE.h5dask-lock``, a file next to it that names the
holder. Readers (``mode="r"``, DataLoader workers, ``to_dask`` tasks,
``h5dask info``) never take it.

The session is the open file description's: a forked child inherits the
descriptor, so an at-fork hook closes the child's copy (the parent keeps the
lock, and the child can neither use nor release it). A killed writer's lock
goes with its process; the lock file it leaves is reused by the next writer.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import math
import os
import socket
import sys
import time
import weakref
from typing import Any

from .errors import FileLockedError, ReadOnlyError
from .handle import forks
from .repair import flock, uses_locks

__all__ = ["WriterSession", "lock_path", "LOCK_SUFFIX"]

LOCK_SUFFIX = ".h5dask-lock"
POLL = 0.02


def lock_path(filename: str | os.PathLike) -> str:
    """The lock file of ``filename``'s writer session."""
    return os.fspath(filename) + LOCK_SUFFIX


class WriterSession:
    """The right to write one file, held by one writer from :meth:`acquire` to :meth:`release`.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.h5")
    >>> session = WriterSession.acquire(path, timeout=0)
    >>> WriterSession.acquire(path, timeout=0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    h5dask.errors.FileLockedError: ... is being written by another writer of this process ...
    >>> session.release()
    """

    def __init__(self, filename: str, fd: int | None):
        self.filename = filename
        self._fd = fd
        self._forks = forks()
        self._held = True
        _sessions.add(self)

    @classmethod
    def acquire(
        cls, filename: str, timeout: float | None = 0.0, h5_kwargs: dict[str, Any] | None = None
    ) -> WriterSession:
        """Hold the session of ``filename``, waiting up to ``timeout`` seconds for its holder.

        ``timeout=None`` waits as long as it takes. A file in memory
        (``driver="core"`` without a backing store), ``locking=False`` and file
        systems without locks get a session that locks nothing, as HDF5 does.

        Raises
        ------
        FileLockedError
            Another writer (another process, or another TypedFile or ``create``
            of this one) still holds the session after ``timeout`` seconds; it
            names the file and the holder.
        """
        h5_kwargs = h5_kwargs or {}
        in_memory = h5_kwargs.get("driver") == "core" and not h5_kwargs.get("backing_store", True)
        if in_memory or not uses_locks(h5_kwargs):
            return cls(filename, None)
        deadline = time.monotonic() + (math.inf if timeout is None else timeout)
        while True:
            fd = _try_lock(lock_path(filename))
            if isinstance(fd, int):
                _describe_holder(fd)
                return cls(filename, fd)
            if time.monotonic() >= deadline:
                raise FileLockedError(_held_message(filename, fd, timeout))
            time.sleep(POLL)

    @property
    def locks(self) -> bool:
        """Whether the session locks the file (not with ``locking=False``, nor in memory)."""
        return self._fd is not None

    @property
    def held(self) -> bool:
        """Whether this process holds the session (a forked child does not)."""
        return self._held and self._forks == forks()

    def release(self) -> None:
        """Let the next writer in; nothing in a process that did not acquire the session."""
        if not self.held:
            return
        self._held = False
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.unlink(lock_path(self.filename))  # before unlocking: see _try_lock
            except FileNotFoundError:
                pass  # gone with its folder: closing the descriptor still ends the session
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # noqa: S110 - never raise from a finaliser
            pass

    def __repr__(self) -> str:
        state = "held" if self.held else "released"
        return f"<WriterSession of {self.filename!r}, {state}>"


def _try_lock(path: str) -> int | dict[str, Any]:
    """The descriptor of ``path`` locked by this call, or what its holder wrote in it.

    A holder unlinks the lock file before it lets go, so a lock taken on a
    file that is no longer at ``path`` is dropped and taken again.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # never create or lock what a planted link names
                raise FileLockedError(
                    f"{path!r}, the writer lock of {path[: -len(LOCK_SUFFIX)]!r}, is a symbolic "
                    "link; h5dask creates that file itself: remove the link"
                ) from None
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise ReadOnlyError(
                f"cannot write {path[: -len(LOCK_SUFFIX)]!r}: its writer lock {path!r} cannot "
                f"be created ({os.strerror(exc.errno)}); h5dask keeps it and each commit's "
                "journal beside the file, so it needs write access to the folder too"
            ) from None
        try:
            flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            return holder
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass  # its holder unlinked it as we locked it: lock the next one at `path`
        os.close(fd)


def _describe_holder(fd: int) -> None:
    """Write who holds the session into its lock file, for the error of the next writer."""
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": " ".join(sys.argv)[:200],
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    data = json.dumps(holder).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # being written right now
        return {}
    return holder if isinstance(holder, dict) else {}


def _held_message(filename: str, holder: dict[str, Any], timeout: float | None) -> str:
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        who = (
            f"another writer of this process (pid {os.getpid()}): a TypedFile that wrote to "
            "it holds it until its close(), a create() until it returns; write through that "
            "object, or close it first"
        )
    elif holder:
        who = (
            f"process {holder.get('pid')} on {holder.get('host')!r} "
            f"({holder.get('command')!r}), since {holder.get('since')}"
        )
    else:
        who = "another process"
    waited = f" in {timeout:g} s of waiting" if timeout else ""
    return (
        f"{filename!r} is being written by {who}. A file has one writer at a time: nothing "
        f"was written{waited}. Pass lock_timeout=SECONDS to wait for the other writer, or "
        "open the file with mode='r' to read what it committed"
    )


_sessions: weakref.WeakSet[WriterSession] = weakref.WeakSet()


def _forget_inherited() -> None:
    """In a forked child, close the inherited descriptors: the parent keeps its locks."""
    for session in list(_sessions):
        fd, session._fd = session._fd, None
        if fd is not None:
            os.close(fd)


os.register_at_fork(after_in_child=_forget_inherited)


@atexit.register  # registered before typed_file's, so it runs after buffered writes commit
def _release_all() -> None:
    for session in list(_sessions):
        session.release()
