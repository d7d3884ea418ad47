"""Rows of uncompressed datasets read straight from the file, in parallel.

h5py runs every HDF5 call under one lock, so threads reading one file take
turns, and HDF5 copies what it reads through its own buffers. The rows of a
dataset stored without filters are plain bytes at offsets HDF5 can tell:
:func:`read_rows` asks it where they are, then reads them with
:func:`os.preadv` straight into the block it returns. ``preadv`` releases the
GIL, so the threads of a dask scheduler read at once.

It applies only where the bytes on disk are the array's bytes; anything else
(filters, foreign byte order, chunks across the trailing axes, unwritten
chunks, in-memory files, external or virtual storage, a file
this process also has open for writing, whose writes HDF5 may still hold in
its caches) is left to h5py by returning ``None``.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from . import format as fmt

__all__ = ["read_rows"]


def read_rows(ds: h5py.Dataset, start: int, stop: int) -> np.ndarray | None:
    """Rows ``[start, stop)`` of ``ds`` read with ``preadv``, or ``None`` where that cannot be.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with h5py.File(f"{tmp}/a.h5", "w") as f:
    ...         _ = f.create_dataset("x", data=np.arange(12.0).reshape(6, 2), chunks=(4, 2))
    ...     with h5py.File(f"{tmp}/a.h5", "r") as f:
    ...         read_rows(f["x"], 3, 5).tolist()
    [[6.0, 7.0], [8.0, 9.0]]
    """
    if not _stored_as_is(ds) or not 0 <= start <= stop <= ds.shape[0]:
        return None
    row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
    runs = _runs(ds, start, stop, row_bytes)
    if runs is None:
        return None
    out = np.empty((stop - start, *ds.shape[1:]), dtype=ds.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    fd = ds.file.id.get_vfd_handle()
    for offset, at, size in runs:
        if not _pread_into(fd, view[at : at + size], offset):
            return None  # a chunk past the end of the file: let HDF5 report it
    return out


def _stored_as_is(ds: h5py.Dataset) -> bool:
    """Whether ``ds``'s rows are on disk byte for byte as numpy holds them."""
    if ds.ndim == 0 or ds.dtype.kind not in "biuf" or not ds.dtype.isnative or ds.is_virtual:
        return False
    if ds.chunks is not None and ds.chunks[1:] != ds.shape[1:]:
        return False
    dcpl = ds.id.get_create_plist()
    if dcpl.get_nfilters() or fmt.other_files(ds, dcpl):  # external raw storage
        return False
    file = ds.file  # read-only: no HDF5 handle in this process may hold unflushed writes
    return file.mode == "r" and file.driver == "sec2"


def _runs(ds: h5py.Dataset, start: int, stop: int, row_bytes: int) -> list[list[int]] | None:
    """``[file offset, offset in the block, size]`` of each contiguous stretch of the rows."""
    if ds.chunks is None:
        base = ds.id.get_offset()
        if base is None:
            return None
        return [[base + start * row_bytes, 0, (stop - start) * row_bytes]]
    step, zeros = ds.chunks[0], (0,) * (ds.ndim - 1)
    runs: list[list[int]] = []
    for first in range(start - start % step, stop, step):
        info = ds.id.get_chunk_info_by_coord((first, *zeros))
        lo, hi = max(start, first), min(stop, first + step)
        if info.byte_offset is None or info.size < (hi - first) * row_bytes:
            return None  # unwritten (HDF5 gives fill values) or not what the layout says
        offset, size = info.byte_offset + (lo - first) * row_bytes, (hi - lo) * row_bytes
        if runs and runs[-1][0] + runs[-1][2] == offset:
            runs[-1][2] += size
        else:
            runs.append([offset, (lo - start) * row_bytes, size])
    return runs


def _pread_into(fd: int, buffer: memoryview, offset: int) -> bool:
    """Fill ``buffer`` from ``offset`` of ``fd``; False if the file ends first."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            return False
        done += n
    return True
