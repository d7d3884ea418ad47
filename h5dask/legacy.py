"""Files written by h5mapper: read them as they are, or convert them to h5dask's format.

h5mapper 0.3.3 lays a file out as h5dask does (one group a feature, ids in
``/__src__/id``) but names a feature's datasets ``__arr__`` (the
concatenation) and ``__ref__`` (one HDF5 region reference per id, null where
the id has no data), and lists the features in ``/__src__/ds_keys``.
:class:`~h5dask.TypedFile` reads such a file read-only: its region references
become the integer ``[start, stop)`` rows h5dask uses. :func:`convert` (and
``h5dask convert OLD.h5 NEW.h5``) rewrites it in h5dask's format, with the same
ids, in the same order, and the same values.
"""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np

from .errors import FileFormatError, H5DaskError
from .extract import unflatten

__all__ = ["VALUES", "REFS", "FEATURES", "is_h5mapper", "read_region_refs", "convert"]

VALUES = "__arr__"
REFS = "__ref__"
FEATURES = "__src__/ds_keys"


def is_h5mapper(f: h5py.File) -> bool:
    """Whether ``f`` was written by h5mapper: its list of features, and no h5dask label."""
    return f.attrs.get("format") is None and FEATURES in f


def read_region_refs(group: h5py.Group, n: int) -> np.ndarray:
    """The ``(n, 2)`` ``[start, stop)`` table of an h5mapper feature's region references.

    A null reference, or none at all past the end of ``__ref__`` (an id added
    after the feature's last write), is ``(-1, -1)``.

    Raises
    ------
    FileFormatError
        ``__ref__`` does not hold region references, or one selects anything
        but a run of whole rows of ``__arr__``.
    """
    refs, values = group[REFS], group[VALUES]
    where = f"{group.file.filename!r}, feature {group.name.lstrip('/')!r}"
    if h5py.check_dtype(ref=refs.dtype) is not h5py.RegionReference:
        raise FileFormatError(f"{where}: {REFS} holds {refs.dtype}, not region references")
    table = np.full((n, 2), -1, dtype=np.int64)
    for i, ref in enumerate(refs[: min(n, refs.shape[0])]):
        if ref:
            table[i] = _rows(h5py.h5r.get_region(ref, values.id), values.shape, where, i)
    return table


def _rows(space: h5py.h5s.SpaceID, shape: tuple[int, ...], where: str, i: int) -> tuple[int, int]:
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_NONE or space.get_select_npoints() == 0:
        return 0, 0  # an empty region
    start, end = space.get_select_bounds()
    whole = kind in (h5py.h5s.SEL_ALL, h5py.h5s.SEL_HYPERSLABS) and all(
        s == 0 and e == d - 1 for s, e, d in zip(start[1:], end[1:], shape[1:], strict=True)
    )
    rows = end[0] - start[0] + 1
    if not whole or space.get_select_npoints() != rows * int(np.prod(shape[1:], dtype=np.int64)):
        raise FileFormatError(f"{where}: the region reference of id #{i} is not a run of rows")
    return start[0], end[0] + 1


def convert(old: str | os.PathLike, new: str | os.PathLike, progress: bool = False) -> Any:
    """Rewrite the h5mapper file ``old`` as the h5dask file ``new``: same ids, same values.

    Every id keeps its position; each feature's array of each id is copied,
    as are the attributes of the root and of every group.

    Parameters
    ----------
    old : str or os.PathLike
        A file written by h5mapper.
    new : str or os.PathLike
        The h5dask file to write (refused if it exists).
    progress : bool
        Show a progress bar over the ids.

    Returns
    -------
    TypedFile
        ``new``, open read-only.

    Raises
    ------
    FileExistsError
        ``new`` exists.
    FileFormatError
        ``old`` is not an h5mapper file.
    H5DaskError
        An id of ``old`` holds no data in any feature: h5dask keeps no such id.

    Examples
    --------
    >>> from h5dask.legacy import convert
    >>> file = convert("old-h5mapper.h5", "new.h5")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .typed_file import TypedFile

    if os.path.exists(new):
        raise FileExistsError(f"{os.fspath(new)!r} exists: convert writes a new file")
    source = TypedFile(old, keep_open=True)
    if not source.legacy:
        raise FileFormatError(f"{os.fspath(old)!r} was not written by h5mapper: nothing to convert")
    features = {path: source.get_proxy(path) for path in source._feature_paths()}
    with TypedFile(new, mode="x") as out:
        for id in tqdm(source.ids.tolist(), desc="convert", unit="id", disable=not progress):
            data = {p: f.get(id) for p, f in features.items()}
            data = {p: v for p, v in data.items() if v is not None}
            if not data:
                raise H5DaskError(
                    f"{os.fspath(old)!r}: id {id!r} holds no data in any feature; h5dask "
                    "keeps no id without data, so the converted file would lose it"
                )
            out.add(id, unflatten(data))
    _copy_attrs(os.fspath(old), os.fspath(new))
    return TypedFile(new)


def _copy_attrs(old: str, new: str) -> None:
    """The attributes of the root and of every group of ``old`` onto ``new``'s."""
    with h5py.File(old, "r") as src, h5py.File(new, "r+") as dst:
        groups = [""]
        src.visit(lambda name: groups.append(name) if isinstance(src[name], h5py.Group) else None)
        for name in groups:
            if name.split("/")[-1] in (VALUES, REFS) or name.startswith("__src__"):
                continue
            if name and name not in dst:
                continue
            target = dst[name] if name else dst
            for key, value in src[name or "/"].attrs.items():
                if key not in ("format", "format_version"):
                    target.attrs[key] = value
