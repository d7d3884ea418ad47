"""The h5dask file format: thin reads and writes of ids, values, refs and attrs.

Everything here takes open :class:`h5py.File` or :class:`h5py.Group` objects
and neither opens nor closes files. ``docs/FORMAT.md`` documents the layout.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import h5py
import numpy as np

from . import legacy
from .errors import ExternalFileError, FileFormatError, H5DaskError, describe

FORMAT = "h5dask"
FORMAT_VERSION = 1
IDS = "__src__/id"
ERRORS = "__errors__"
VALUES = "values"
REFS = "refs"
RESERVED = ("__src__", ERRORS)
JSON_ATTRS = "__json__"
CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 16 << 10
FIRST_SOURCES_PER_CHUNK = 1024
TABLE_CHUNK_ROWS = 16384
MAX_RANK = 32  # dimensions of an HDF5 dataset
MAX_DEPTH = 2048  # levels of groups h5dask reads: a path of 2048 one-letter names is 4 KiB

UTF8 = h5py.string_dtype("utf-8")
BYTES = h5py.string_dtype("ascii")


# what h5py raises where HDF5 meets damaged metadata or data: RuntimeError and OSError from
# HDF5's error stack, KeyError for a link it cannot follow, UnicodeDecodeError for names and
# strings that are not UTF-8 (a table claiming more rows than memory holds is checked
# before it is read: a MemoryError may be a large read of a sound file)
DAMAGE = (RuntimeError, OSError, KeyError, UnicodeDecodeError)


@contextmanager
def reading(filename: str) -> Iterator[None]:
    """Turn what h5py raises on a damaged file, inside the block, into a FileFormatError.

    For h5dask's own reads of a file only, never around user code. h5dask's
    errors, and a file that is missing or may not be read, pass as they are.

    Examples
    --------
    >>> with reading("f.h5"):  # doctest: +SKIP
    ...     layout = read_layout(f)
    """
    try:
        yield
    except (H5DaskError, FileNotFoundError, PermissionError):
        raise
    except DAMAGE as exc:
        cause = str(exc) or type(exc).__name__
        raise FileFormatError(f"{filename!r} is damaged: {type(exc).__name__}: {cause}") from exc


def init_root(f: h5py.File) -> None:
    """Mark ``f`` as an h5dask file and create its id table if missing."""
    f.attrs["format"] = FORMAT
    f.attrs["format_version"] = FORMAT_VERSION
    if IDS not in f:
        f.create_dataset(IDS, shape=(0,), maxshape=(None,), dtype=UTF8, chunks=(TABLE_CHUNK_ROWS,))


def is_feature_group(obj: Any, h5mapper: bool = False) -> bool:
    """Whether ``obj`` is a feature group: a group holding ``values`` and ``refs``
    (or, in a file of ``h5mapper``, ``__arr__`` and ``__ref__``)."""
    return feature_names(obj, h5mapper) is not None


def feature_names(obj: Any, h5mapper: bool = False) -> tuple[str, str] | None:
    """The names of the values and refs datasets of a feature group, or None if it is not one."""
    if not isinstance(obj, h5py.Group):
        return None
    names = (legacy.VALUES, legacy.REFS) if h5mapper else (VALUES, REFS)
    return names if all(_hard_class(obj, n) is h5py.Dataset for n in names) else None


def hard_get(
    f: h5py.File, path: str, reached: dict[str, Any] | None = None
) -> h5py.HLObject | None:
    """The object at ``path`` reached through hard links only, else None (never opens a file).

    ``reached`` keeps the objects met on the way, by path: a walk to many paths
    of one file starts from the deepest one reached before, so deep groups cost
    one step a level, not one a level and a path.
    """
    parts = [part for part in path.split("/") if part]
    reached = {} if reached is None else reached
    known = len(parts)
    while known and "/".join(parts[:known]) not in reached:
        known -= 1
    obj: Any = reached["/".join(parts[:known])] if known else f
    for k in range(known, len(parts)):
        if not isinstance(obj, h5py.Group) or _hard_class(obj, parts[k]) is None:
            return None
        obj = reached["/".join(parts[: k + 1])] = obj[parts[k]]
    return obj


def _hard_class(group: h5py.Group, name: str) -> type | None:
    """The class of ``group[name]`` when it is a hard link; None for soft and external links.

    Soft links can lead into external links and external links open other files,
    so h5dask follows neither.
    """
    if not isinstance(group.get(name, getlink=True), h5py.HardLink):
        return None
    return group.get(name, getclass=True)


def other_files(ds: h5py.Dataset, dcpl: h5py.h5p.PropDCID | None = None) -> tuple[str, ...]:
    """The files other than its own that ``ds``'s data is read from, as the file names them.

    Raw data stored in external files (``h5py`` ``external=``) and the sources of
    a virtual dataset (its own file, ``"."``, aside). HDF5 opens them on each
    read; h5dask does not unless allowed (:func:`check_local`).
    """
    dcpl = dcpl or ds.id.get_create_plist()
    names = [dcpl.get_external(i)[0] for i in range(dcpl.get_external_count())]
    if dcpl.get_layout() == h5py.h5d.VIRTUAL:
        names += [dcpl.get_virtual_filename(i) for i in range(dcpl.get_virtual_count())]
    decoded = (n.decode("utf-8", "backslashreplace") if isinstance(n, bytes) else n for n in names)
    return tuple(dict.fromkeys(n for n in decoded if n != "."))


def own_files(f: h5py.File) -> frozenset[str]:
    """The other files that h5dask itself recorded as parts of ``f`` (its shards, once the
    format has them), which reading ``f`` may open without being allowed to: none yet."""
    return frozenset()


def check_local(ds: h5py.Dataset, allow_external: bool = False) -> h5py.Dataset:
    """``ds``, if reading it opens no file but its own (see :func:`other_files`).

    Raises
    ------
    ExternalFileError
        ``ds`` reads other files and ``allow_external`` is False.
    """
    if not allow_external:
        own = own_files(ds.file)
        files = tuple(name for name in other_files(ds) if name not in own)
        refuse_other_files(ds.file.filename, ds.name, files)
    return ds


def refuse_other_files(filename: str, path: str, foreign: tuple[str, ...]) -> None:
    """Raise :class:`ExternalFileError` if HDF5 reads the files ``foreign`` for ``path``."""
    if foreign:
        raise ExternalFileError(
            f"{filename!r}, dataset {path.strip('/')!r}: its data is read from other files "
            f"({', '.join(map(repr, foreign[:3]))}{', ...' if len(foreign) > 3 else ''}: "
            "external storage or a virtual dataset), which h5dask does not open unless "
            "allowed: TypedFile(..., allow_external=True), or h5dask --allow-external"
        )


def n_ids(f: h5py.File) -> int:
    """Number of committed ids.

    Raises
    ------
    FileFormatError
        The id table claims more ids than the file has bytes for (a damaged
        dataspace: reading it would exhaust memory).
    """
    if IDS not in f:
        return 0
    ds = f[IDS]
    if ds.shape and ds.shape[0] * min(ds.dtype.itemsize, 16) > f.id.get_filesize():
        raise FileFormatError(
            f"{f.filename!r}: /{IDS} claims {ds.shape[0]} ids in a file of "
            f"{f.id.get_filesize()} bytes (a damaged dataspace?)"
        )
    return ds.shape[0] if ds.shape else 0


def read_ids(f: h5py.File, allow_external: bool = False) -> np.ndarray:
    """All committed ids, as a fixed-width array of their UTF-8 bytes (no object per id).

    Raises
    ------
    ExternalFileError
        The id table reads another file (see :func:`check_local`).
    """
    if not n_ids(f):
        return np.array([], dtype="S1")
    return check_local(f[IDS], allow_external)[:].astype("S")


def check_root(f: h5py.File) -> None:
    """Refuse a file that h5dask cannot read safely: a future version or a bad id table.

    Raises
    ------
    FileFormatError
        Naming the file and the problem.
    """
    where = f"{f.filename!r}"
    version = f.attrs.get("format_version", FORMAT_VERSION)
    if not isinstance(version, (int, np.integer)) or isinstance(version, (bool, np.bool_)):
        raise FileFormatError(f"{where}: format_version is {_short(version)}, not an integer")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{where}: format_version {int(version)} is newer than this h5dask reads "
            f"({FORMAT_VERSION}); upgrade h5dask"
        )
    src = f.get("__src__", getlink=True)
    link = f["__src__"].get("id", getlink=True) if isinstance(src, h5py.HardLink) else src
    if link is None:
        if _attr_str(f, "format") == FORMAT:
            raise FileFormatError(f"{where}: an h5dask file with no id table /{IDS}")
        return
    if not isinstance(link, h5py.HardLink) or f.get(IDS, getclass=True) is not h5py.Dataset:
        raise FileFormatError(f"{where}: /{IDS} is not a dataset")
    ds = f[IDS]
    if ds.ndim != 1 or (ds.dtype.kind != "S" and not is_string_dtype(ds.dtype)):
        raise FileFormatError(
            f"{where}: /{IDS} has shape {ds.shape} and dtype {ds.dtype}, not 1-D strings"
        )


def _attr_str(obj: h5py.HLObject, name: str) -> str | None:
    value = obj.attrs.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def id_problem(id: str) -> str | None:
    """Why ``id`` cannot be stored in the id table (a UTF-8 HDF5 string), or None.

    Examples
    --------
    >>> id_problem("run-1/é"), id_problem("a\\0b")
    (None, 'holds a NUL character, which HDF5 strings cannot store')
    """
    if "\0" in id:
        return "holds a NUL character, which HDF5 strings cannot store"
    try:
        id.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (a file name in another encoding?), which the id table stores"
    return None


def append_ids(f: h5py.File, ids: list[str] | np.ndarray) -> None:
    """Append ``ids`` to the id table: the commit point of a batch.

    ``ids`` are strings, or their UTF-8 encodings as a fixed-width bytes
    array (which HDF5 converts faster; ids never end in NUL, see
    :func:`id_problem`). If writing them fails, the table is cut back: it
    never holds a row that was not written.
    """
    ds = f[IDS]
    start = ds.shape[0]
    try:
        append_rows(ds, ids if isinstance(ids, np.ndarray) else np.array(ids, dtype=object))
    except BaseException:
        ds.resize(start, axis=0)
        raise


def read_refs(group: h5py.Group, n: int, allow_external: bool = False) -> np.ndarray:
    """The first ``n`` rows of a feature group's ref table, checked (see :func:`check_refs`).

    Raises
    ------
    FileFormatError
        The table is not ``(>= n, 2)`` integers, or a row points outside ``values``.
    ExternalFileError
        The table reads another file (see :func:`check_local`).
    """
    if REFS not in group and legacy.REFS in group:  # a file of h5mapper: region references
        check_local(group[legacy.REFS], allow_external)
        table = legacy.read_region_refs(group, n)
        check_refs(table, check_local(group[legacy.VALUES], allow_external).shape[0], _where(group))
        return table
    refs, where = check_local(group[REFS], allow_external), _where(group)
    if refs.ndim != 2 or refs.shape[1] != 2 or refs.dtype.kind not in "iu":
        raise FileFormatError(
            f"{where}: refs has shape {refs.shape} and dtype {refs.dtype}, not (n_ids, 2) integers"
        )
    if refs.shape[0] < n:
        raise FileFormatError(f"{where}: refs has {refs.shape[0]} rows for {n} ids")
    values = group[VALUES]
    if values.ndim == 0:
        raise FileFormatError(f"{where}: values is a scalar, not a concatenation of arrays")
    table = refs[:n].astype(np.int64) if n else np.empty((0, 2), dtype=np.int64)
    check_refs(table, values.shape[0], where)
    if values.shape[0] and not (table[:, 0] >= 0).any() and refs.shape[0] == n:
        raise FileFormatError(f"{where}: values holds {values.shape[0]} rows but no id has any")
    _check_allocated(values, where)
    return table


def _check_allocated(values: h5py.Dataset, where: str) -> None:
    """Refuse ``values`` whose chunks are not all in the file: h5dask writes every row it
    appends, so a missing chunk is a damaged chunk index (HDF5 would read fill values).

    Two cheap looks, whatever the size: the number of chunks the index holds, and the
    first and the last chunk by their place.
    """
    if values.chunks is None or not values.size:
        return
    expected = math.prod(-(-n // c) for n, c in zip(values.shape, values.chunks, strict=True))
    stored = values.id.get_num_chunks()
    last = tuple((n - 1) // c * c for n, c in zip(values.shape, values.chunks, strict=True))
    for corner in ((0,) * values.ndim, last):
        if values.id.get_chunk_info_by_coord(corner).byte_offset is None:
            stored = min(stored, expected - 1)
    if stored < expected:
        raise FileFormatError(
            f"{where}: values has {stored} of its {expected} chunks in the file (a damaged "
            "chunk index?): the others would read as fill values"
        )


def check_refs(table: np.ndarray, n_rows: int, where: str) -> None:
    """Check a ref table against a ``values`` dataset of ``n_rows`` rows, in vectorised passes.

    Each row is ``(-1, -1)`` (absent) or ``0 <= start <= stop <= n_rows``, and the
    non-empty regions do not overlap, so that no read goes outside ``values`` and
    writing one id's region in place never changes another's.

    Raises
    ------
    FileFormatError
        Naming ``where``, the first bad row and its values.
    """
    start, stop = table[:, 0], table[:, 1]
    absent = (start == -1) & (stop == -1)
    bad = ~absent & ((start < 0) | (start > stop) | (stop > n_rows))
    if bad.any():
        i = int(np.argmax(bad))
        raise FileFormatError(
            f"{where}: ref row {i} is [{start[i]}, {stop[i]}), not (-1, -1) nor a region "
            f"0 <= start <= stop <= {n_rows} of values"
        )
    live = np.flatnonzero(start < stop)
    starts, stops = start[live], stop[live]
    if np.all(starts[1:] >= stops[:-1]):  # regions in file order: the common case, no sort
        return
    order = np.argsort(starts, kind="stable")
    clash = starts[order[1:]] < stops[order[:-1]]
    if clash.any():
        k = int(np.argmax(clash))
        i, j = sorted((int(live[order[k]]), int(live[order[k + 1]])))
        raise FileFormatError(
            f"{where}: ref rows {i} [{start[i]}, {stop[i]}) and {j} [{start[j]}, {stop[j]}) overlap"
        )


def _where(group: h5py.Group) -> str:
    return f"{group.file.filename!r}, feature {group.name.strip('/')!r}"


def storage_dtype(array: np.ndarray) -> np.dtype:
    """The HDF5 dtype that stores ``array``: UTF-8 or byte strings, else its own."""
    if array.dtype.kind in "UOT":
        return UTF8
    if array.dtype.kind == "S":
        return BYTES
    return array.dtype


def is_string_dtype(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is an h5py variable-length string dtype."""
    return h5py.check_string_dtype(dtype) is not None


def item_nbytes(dtype: np.dtype) -> int:
    """Bytes an item of ``dtype`` counts for chunking: a variable-length string counts 64."""
    return 64 if is_string_dtype(dtype) else max(1, dtype.itemsize)


def text_problem(text: str | bytes) -> str | None:
    """Why an HDF5 string cannot hold ``text`` as it is, or None.

    HDF5 strings end at the first NUL and hold UTF-8 (numpy, for its part, cuts
    the NULs that end a ``bytes`` or ``str`` it turns into an array).

    Examples
    --------
    >>> text_problem("é") is None
    True
    >>> text_problem(b"ab\\0")
    'holds a NUL byte at offset 2, which HDF5 strings cannot store; store binary data as \
an array of bytes: np.frombuffer(data, np.uint8)'
    """
    if isinstance(text, bytes):
        at = text.find(b"\0")
        if at < 0:
            return None
        return (
            f"holds a NUL byte at offset {at}, which HDF5 strings cannot store; store binary "
            "data as an array of bytes: np.frombuffer(data, np.uint8)"
        )
    at = text.find("\0")
    if at >= 0:
        return (
            f"holds a NUL character at offset {at}, which HDF5 strings cannot store; remove "
            "it, or store the bytes: np.frombuffer(text.encode('utf-8'), np.uint8)"
        )
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"holds {text[exc.start]!r} at offset {exc.start}, a lone surrogate that UTF-8 "
            "cannot encode (text decoded with errors='surrogateescape', such as a file name "
            "in another encoding?); decode its bytes with their encoding, or store them: "
            "np.frombuffer(text.encode('utf-8', 'surrogateescape'), np.uint8)"
        )
    return None


def strings_problem(array: np.ndarray) -> str | None:
    """Why HDF5 strings cannot hold every element of ``array`` (of str or bytes), or None.

    Examples
    --------
    >>> strings_problem(np.array(["a", "b\\0c"])).split(",")[0]
    'element [1] holds a NUL character at offset 1'
    """
    items = array.ravel().tolist()  # fixed-width elements lose the NULs that pad them
    if array.dtype.kind == "S":
        if b"\0" not in b"".join(items):
            return None
    elif all(type(item) is str for item in items) and text_problem("".join(items)) is None:
        return None  # one check of all the text: the common case
    first, problem = next(
        (k, text_problem(item)) for k, item in enumerate(items)
        if isinstance(item, (str, bytes)) and text_problem(item)
    )  # fmt: skip
    index = ", ".join(map(str, np.unravel_index(first, array.shape)))
    return f"element [{index}] {problem}"


def rows_problem(array: np.ndarray) -> str | None:
    """Why a feature cannot store arrays like ``array`` (its dtype, its shape past axis 0),
    or None.

    Examples
    --------
    >>> rows_problem(np.zeros((3, 0))).split(":")[0]
    'an array of shape (3, 0) cannot be stored'
    """
    if array.ndim > MAX_RANK:
        return (
            f"an array of {array.ndim} dimensions cannot be stored: HDF5 datasets have at "
            f"most {MAX_RANK}; store array.reshape(len(array), -1) and the shape apart"
        )
    if 0 in array.shape[1:]:
        return (
            f"an array of shape {array.shape} cannot be stored: an axis of length 0 past the "
            "first leaves HDF5 no chunk to store rows in; return None for no data"
        )
    if array.dtype.kind == "M":
        return (
            f"{array.dtype} values cannot be stored: HDF5 has no date type; store "
            "array.astype('int64') (and the unit apart) or np.datetime_as_string(array)"
        )
    if array.dtype.kind == "m":
        return (
            f"{array.dtype} values cannot be stored: HDF5 has no duration type; store "
            "array.astype('int64') (and the unit apart)"
        )
    return None


def dataset_problem(like: np.ndarray, ds_kwargs: dict[str, Any]) -> str | None:
    """Why HDF5 refuses the ``values`` dataset of a feature of arrays ``like`` this one
    created with ``ds_kwargs``, or None: :func:`create_feature` tried in a file in memory.

    Examples
    --------
    >>> dataset_problem(np.zeros((1, 3)), {"compression": "gzip"}) is None
    True
    >>> dataset_problem(np.zeros((1, 3)), {"compression": "nope"}).split(";")[0]
    'HDF5 cannot create its dataset (ValueError: Compression filter "nope" is unavailable)'
    """
    name = f"h5dask-trial-{uuid.uuid4().hex}.h5"
    with h5py.File(name, "w", driver="core", backing_store=False) as f:
        try:
            create_feature(f, "feature", like, like.nbytes, ds_kwargs, 0)
        except (TypeError, ValueError, AttributeError) as exc:  # h5py's, for bad keywords,
            # filters and dtypes (AttributeError: a number as the fill value of strings)
            hint = _FILTER_HINT if "filter" in str(exc) else ""
            return f"HDF5 cannot create its dataset ({describe(exc)}){hint}"
    return None


_FILTER_HINT = "; filters such as zstd, lz4 or blosc come with hdf5plugin (install and import it)"


def ds_kwargs_problem(ds_kwargs: dict[str, Any]) -> str | None:
    """Why no feature can be created with ``ds_kwargs`` (an unknown compression filter or
    keyword, a dtype HDF5 has no type for...), whatever arrays it holds, or None.

    Without a ``dtype`` in ``ds_kwargs``, they must fit one of numbers or strings (a filter
    such as ``scaleoffset`` takes numbers only); ``chunks``, which depend on the arrays'
    shape, are checked at the first write.

    Examples
    --------
    >>> ds_kwargs_problem({"compression": "lzf", "shuffle": True}) is None
    True
    >>> ds_kwargs_problem({"compresion": "gzip"})
    "HDF5 cannot create its dataset (TypeError: make_new_dset() got an unexpected keyword \
argument 'compresion')"
    """
    kwargs = {k: v for k, v in ds_kwargs.items() if k != "chunks"}
    if not kwargs:
        return None
    likes = [np.empty(1)] if "dtype" in kwargs else [np.empty(1), np.empty(1, int), np.array([""])]
    first = None
    for like in likes:
        problem = dataset_problem(like, kwargs)
        if problem is None:
            return None
        first = first or problem
    return first


def default_chunks(
    trailing: tuple[int, ...], dtype: np.dtype, first_nbytes: int = CHUNK_BYTES
) -> tuple[int, ...]:
    """Chunks of about :data:`CHUNK_BYTES`: whole rows when a row fits, else split rows.

    A dataset whose first source is small (``first_nbytes``) gets chunks of
    about :data:`FIRST_SOURCES_PER_CHUNK` such sources, down to
    :data:`MIN_CHUNK_BYTES`: a log of a few numbers does not take a whole MiB
    on disk. The first source, not the first write, sets them, so chunks do
    not depend on how results were batched (a resumed build equals a clean one).
    """
    itemsize = item_nbytes(dtype)
    target = FIRST_SOURCES_PER_CHUNK << max(0, int(first_nbytes) - 1).bit_length()
    target = min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, target))
    shape = [max(1, n) for n in trailing]
    while math.prod(shape) * itemsize > target and max(shape) > 1:
        axis = int(np.argmax(shape))
        shape[axis] = math.ceil(shape[axis] / 2)
    rows = max(1, target // (math.prod(shape) * itemsize))
    return (rows, *shape)


def create_feature(
    parent: h5py.File,
    path: str,
    like: np.ndarray,
    first_rows: int,
    ds_kwargs: dict[str, Any],
    n: int,
) -> h5py.Group:
    """Create the feature group ``path`` with empty ``values`` for arrays ``like`` this
    one (in dtype and trailing shape); ``first_rows``, the length of the first source's
    array, sets default chunks.

    The first source's size is counted as stored (:func:`item_nbytes`), not as
    ``like`` holds it: a block of numpy strings is as wide as its longest one, so
    that counting would make chunks depend on batching.

    Numbers are stored without a fill value unless ``ds_kwargs`` sets one: the append
    that grows ``values`` writes every row it adds, so HDF5 need not fill a new chunk
    first (a write of the whole chunk, each time a commit ends inside one).
    """
    group = parent.require_group(path)
    kwargs = dict(ds_kwargs)
    dtype = np.dtype(kwargs.pop("dtype", storage_dtype(like)))
    trailing = like.shape[1:]
    kwargs.pop("shape", None)
    kwargs.pop("maxshape", None)
    if kwargs.get("chunks", True) is True or kwargs.get("chunks") is None:
        first_nbytes = max(1, first_rows) * item_nbytes(dtype) * math.prod(trailing)
        kwargs["chunks"] = default_chunks(trailing, dtype, first_nbytes)
    if "fillvalue" not in kwargs and not is_string_dtype(dtype):
        kwargs.setdefault("fill_time", "never")  # rows are written before they are read
    group.create_dataset(
        VALUES, shape=(0, *trailing), maxshape=(None, *trailing), dtype=dtype, **kwargs
    )
    group.create_dataset(
        REFS,
        shape=(n, 2),
        maxshape=(None, 2),
        dtype=np.int64,
        chunks=(TABLE_CHUNK_ROWS, 2),
        fillvalue=-1,
    )
    return group


def append_rows(ds: h5py.Dataset, rows: np.ndarray) -> tuple[int, int]:
    """Append ``rows`` along axis 0 of ``ds``; return the written ``[start, stop)``."""
    start = ds.shape[0]
    stop = start + rows.shape[0]
    if stop > start:
        ds.resize(stop, axis=0)
        ds[start:stop] = rows
    return start, stop


def append_blocks(ds: h5py.Dataset, blocks: list[np.ndarray]) -> int:
    """Append ``blocks`` along axis 0 of ``ds`` with one resize; return the start.

    Writes follow the HDF5 chunks: the whole chunks inside a block are written
    straight from it, and only a chunk that straddles blocks is assembled (at
    most one chunk of rows copied), so that with the chunk cache off (as the
    writer opens files) HDF5 neither copies the data nor reads back any chunk
    but the partial ones at both ends.
    """
    start = pending_at = offset = ds.shape[0]
    stop = start + sum(block.shape[0] for block in blocks)
    if stop == start:
        return start
    ds.resize(stop, axis=0)
    step = ds.chunks[0] if ds.chunks else stop
    pending: list[np.ndarray] = []  # rows [pending_at, offset), within one chunk
    for block in blocks:
        end = offset + block.shape[0]
        cut = end // step * step  # the last chunk boundary this block reaches
        if cut <= pending_at:
            pending.append(block)
        else:
            direct = offset
            if pending:  # complete the chunk that pending began
                direct = (pending_at // step + 1) * step
                _write_rows(ds, pending_at, [*pending, block[: direct - offset]])
            _write_rows(ds, direct, [block[direct - offset : cut - offset]])
            pending, pending_at = [block[cut - offset :]], cut
        offset = end
    _write_rows(ds, pending_at, pending)
    return start


def _write_rows(ds: h5py.Dataset, at: int, parts: list[np.ndarray]) -> None:
    """Write the concatenation of ``parts`` at row ``at``, copying only if there are several."""
    parts = [part for part in parts if part.shape[0]]
    if parts:
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        ds[at : at + rows.shape[0]] = rows


def unwritten_tail(ds: h5py.Dataset) -> tuple[int, int] | None:
    """The file bytes of the last chunk of ``ds`` past its last row, or None.

    HDF5 allocates a chunk whole at its first write, so a commit that ends
    inside one leaves the rest of it unused until the next rows go in. Only
    for a dataset grown along its first axis in unfiltered chunks as wide as
    its rows (so that rows follow each other in a chunk, as h5dask creates
    ``values`` and the id table).
    """
    n = ds.shape[0]
    if not n or ds.chunks is None or ds.chunks[1:] != ds.shape[1:]:
        return None
    rows = ds.chunks[0]
    if not n % rows or is_filtered(ds):
        return None
    info = ds.id.get_chunk_info_by_coord((n - n % rows,) + (0,) * (ds.ndim - 1))
    if info.byte_offset is None:
        return None
    return info.byte_offset + n % rows * (info.size // rows), info.byte_offset + info.size


def is_filtered(ds: h5py.Dataset) -> bool:
    """Whether the chunks of ``ds`` go through filters (compression, checksums...)."""
    return bool(ds.id.get_create_plist().get_nfilters())


def write_ref_rows(refs: h5py.Dataset, positions: np.ndarray, rows: np.ndarray) -> None:
    """Write ``rows`` at ``positions`` of a ref table in one contiguous block."""
    lo, hi = int(positions.min()), int(positions.max()) + 1
    if hi - lo == len(positions) and np.all(np.diff(positions) == 1):
        refs[lo:hi] = rows
        return
    block = refs[lo:hi]
    block[positions - lo] = rows
    refs[lo:hi] = block


def committed_stop(refs: np.ndarray) -> int:
    """End of the region of ``values`` that committed refs point into."""
    return int(refs[:, 1].max(initial=0))


def trim_uncommitted(f: h5py.File, feature_paths: list[str], allow_external: bool = False) -> None:
    """Cut what a crashed or interrupted batch wrote past the last commit."""
    n = n_ids(f)
    for path in feature_paths:
        group = f[path]
        if group[REFS].shape[0] > n:
            group[REFS].resize(n, axis=0)
        stop = committed_stop(read_refs(group, n, allow_external))
        if group[VALUES].shape[0] > stop:
            group[VALUES].resize(stop, axis=0)


def attrs_problem(attrs: Any) -> str | None:
    """Why :func:`write_attrs` cannot store ``attrs`` so that they read back equal, or None.

    Examples
    --------
    >>> attrs_problem({"sr": 22050, "labels": ["a", "b"], "opts": {"k": None}}) is None
    True
    >>> attrs_problem({"opts": {1: "a"}})
    "attrs['opts'] has the key 1 (int), which JSON turns into a str; use str keys"
    """
    if not isinstance(attrs, Mapping):
        return f"attrs are a {type(attrs).__qualname__}, not a dict"
    for key, value in attrs.items():
        if not isinstance(key, str) or not key or key == JSON_ATTRS or text_problem(key):
            return f"attrs have the key {key!r}, which cannot name an HDF5 attribute"
        if _native_attr(value) is None:
            problem = _json_problem(value, f"attrs[{key!r}]")
            if problem:
                return problem
    return None


def _json_problem(value: Any, where: str) -> str | None:
    """Why ``value`` does not come back equal from JSON (tuples aside, which come back as
    lists, as HDF5 arrays do), or None."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if isinstance(value, (list, tuple)):
        problems = (_json_problem(v, f"{where}[{k}]") for k, v in enumerate(value))
        return next((p for p in problems if p), None)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (
                    f"{where} has the key {key!r} ({type(key).__qualname__}), which JSON turns "
                    "into a str; use str keys"
                )
            problem = _json_problem(item, f"{where}[{key!r}]")
            if problem:
                return problem
        return None
    hint = ".tolist()" if isinstance(value, (np.ndarray, np.generic)) else "list, str, int..."
    return (
        f"{where} is a {type(value).__qualname__}, which HDF5 attributes and JSON cannot "
        f"store; convert it ({hint})"
    )


def write_attrs(obj: h5py.HLObject, attrs: dict[str, Any]) -> None:
    """Store ``attrs`` as HDF5 attributes; values HDF5 cannot hold natively go as JSON
    (check them first with :func:`attrs_problem`)."""
    encoded = [k for k in obj.attrs.get(JSON_ATTRS, []) if k not in attrs]
    for key, value in attrs.items():
        native = _native_attr(value)
        if native is None:
            obj.attrs[key] = json.dumps(value)
            encoded.append(key)
        else:
            obj.attrs[key] = native
    if encoded:
        obj.attrs[JSON_ATTRS] = sorted(set(encoded))
    elif JSON_ATTRS in obj.attrs:
        del obj.attrs[JSON_ATTRS]


def read_attrs(obj: h5py.HLObject) -> dict[str, Any]:
    """Read attributes back as Python values, decoding those stored as JSON.

    Raises
    ------
    FileFormatError
        ``__json__`` is not a list of names, or a value it names is not JSON
        (or nests too deeply to decode).
    """
    encoded = _as_python(obj.attrs.get(JSON_ATTRS, []))
    where = f"{obj.file.filename!r}, attribute {JSON_ATTRS!r} of {obj.name!r}"
    if not isinstance(encoded, list) or not all(isinstance(k, str) for k in encoded):
        raise FileFormatError(f"{where} is {_short(encoded)}, not a list of attribute names")
    out = {}
    for key, value in obj.attrs.items():
        if key == JSON_ATTRS:
            continue
        value = _as_python(value)
        out[key] = (
            _json(value, f"{obj.file.filename!r}, attribute {key!r} of {obj.name!r}")
            if key in encoded
            else value
        )
    return out


def _json(text: Any, where: str) -> Any:
    """``json.loads(text)``, a :class:`FileFormatError` naming ``where`` if it is not JSON."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise FileFormatError(
            f"{where} is listed in {JSON_ATTRS!r} but is not JSON: {exc}"
        ) from None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _native_attr(value: Any) -> Any:
    """``value`` as HDF5 stores it natively, or None: it goes as JSON (which escapes what
    an HDF5 string cannot hold)."""
    if isinstance(value, str):
        return None if text_problem(value) else str(value)  # np.str_ has no HDF5 type
    if isinstance(value, (bool, int, float)) or (
        isinstance(value, np.generic) and value.dtype.kind in "biufc"
    ):
        return value
    if isinstance(value, np.bytes_) and b"\0" not in value:
        return value
    if isinstance(value, (list, tuple)) and value and len({_scalar_kind(v) for v in value}) == 1:
        array = np.asarray(value)
        if array.ndim == 1 and array.dtype.kind in "biuf":
            return array
        if array.ndim == 1 and array.dtype.kind == "U" and not strings_problem(array):
            return array.astype(object)
    return None


def _scalar_kind(value: Any) -> str:
    """``"bool"``, ``"number"``, ``"str"`` or ``"other"``: a native list holds one kind only."""
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "number"
    return "str" if isinstance(value, str) else "other"


def _as_python(value: Any) -> Any:
    if isinstance(value, bytes):  # binary that is not UTF-8 stays bytes
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.ndarray):
        return [_as_python(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass(frozen=True)
class Node:
    """What the file holds at a path: a ``"group"``, a ``"feature"`` or a plain ``"dataset"``."""

    kind: str
    shape: tuple[int, ...] | None = None
    dtype: np.dtype | None = None
    chunks: tuple[int, ...] | None = None
    compression: str | None = None
    nbytes_stored: int = 0
    other_files: tuple[str, ...] = ()  # read from other files: see :func:`other_files`
    values: str = VALUES  # a feature's dataset of values (h5mapper's files: ``__arr__``)
    n_attrs: int = 0  # of the group, the feature's group or the dataset


def read_layout(f: h5py.File) -> dict[str, Node]:
    """Map every group, feature and plain dataset of ``f`` (ids and errors aside) to a Node.

    Only hard links are followed, each group once: soft and external links are
    left out, so reading never opens another file; a group reached twice is
    listed once.

    Raises
    ------
    FileFormatError
        A link name is not UTF-8, or groups nest deeper than :data:`MAX_DEPTH`.
    """
    layout: dict[str, Node] = {}
    own = own_files(f)
    for path, kind, obj in _walk(f):
        n_attrs = h5py.h5a.get_num_attrs(obj if kind == "group" else obj.id)
        if kind == "group":
            layout[path] = Node("group", n_attrs=n_attrs)
        elif kind == "feature":
            values, refs = feature_names(obj, legacy.is_h5mapper(f)) or (VALUES, REFS)
            node = _dataset_node(kind, own, n_attrs, obj[values], obj[refs])
            layout[path] = node if values == VALUES else replace(node, values=values)
        else:
            layout[path] = _dataset_node(kind, own, n_attrs, obj)
    return layout


def feature_paths(f: h5py.File) -> list[str]:
    """The paths of the features of ``f``, as :func:`read_layout` finds them, but without
    reading each dataset's shape, type and storage (a commit needs only these)."""
    return [path for path, kind, _ in _walk(f) if kind == "feature"]


def _walk(f: h5py.File) -> Iterator[tuple[str, str, Any]]:
    """Yield ``(path, kind, object)`` for each group, feature and plain dataset, depth first
    (an :class:`h5py.Group` or :class:`h5py.Dataset`, a ``GroupID`` for a group).

    One link iteration a group and one open a member, through h5py's low-level
    API (a group of the high-level API costs about ten HDF5 calls): 40,000
    groups take about a second.
    """
    seen = {h5py.h5o.get_info(f.id).addr}
    h5mapper = legacy.is_h5mapper(f)
    names = [
        name.encode() for name in ((legacy.VALUES, legacy.REFS) if h5mapper else (VALUES, REFS))
    ]
    ours = _attr_str(f, "format") == FORMAT  # in h5dask's files, values and refs go in pairs
    stack: list[tuple[Iterator[tuple[bytes, int]], h5py.h5g.GroupID, str]] = [
        (_hard_links(f.id), f.id, "")
    ]
    while stack:  # depth first with a stack: groups may nest deeper than Python recurses
        links, gid, prefix = stack[-1]
        raw, addr = next(links, (None, 0))
        if raw is None:
            stack.pop()
            continue
        name = _decoded(raw, f, prefix)
        if not prefix and name in RESERVED:
            continue
        path = prefix + name
        oid = h5py.h5o.open(gid, raw)
        if isinstance(oid, h5py.h5d.DatasetID):
            yield path, "dataset", h5py.Dataset(oid)
        elif isinstance(oid, h5py.h5g.GroupID):
            if _is_feature_id(oid, names):
                yield path, "feature", h5py.Group(oid)
            elif ours and (oid.links.exists(b"values") or oid.links.exists(b"refs")):
                raise FileFormatError(
                    f"{f.filename!r}: group {path!r} holds one of 'values' and 'refs' but "
                    "not both as datasets: a feature whose group is damaged, or a link in "
                    "place of one"
                )
            elif addr not in seen:  # hard links can loop
                if len(stack) >= MAX_DEPTH:
                    raise FileFormatError(
                        f"{f.filename!r}: groups nest deeper than {MAX_DEPTH} levels, at "
                        f"{_short(path, 80)}: h5dask does not read such files"
                    )
                seen.add(addr)
                yield path, "group", oid  # low-level: a Group costs a third of the walk
                stack.append((_hard_links(oid), oid, path + "/"))


def _hard_links(gid: h5py.h5g.GroupID) -> Iterator[tuple[bytes, int]]:
    """``(name, address)`` of the hard links of a group, in name order (soft and external
    links left out)."""
    links: list[tuple[bytes, int]] = []
    hard = h5py.h5l.TYPE_HARD

    def add(name: bytes, info: h5py.h5l.LinkInfo) -> None:
        if info.type == hard:
            links.append((name, info.u))

    gid.links.iterate(add, info=True)
    return iter(links)


def _is_feature_id(gid: h5py.h5g.GroupID, names: list[bytes]) -> bool:
    """:func:`is_feature_group` for a low-level group, its datasets named ``names``."""
    for name in names:
        if not gid.links.exists(name) or gid.links.get_info(name).type != h5py.h5l.TYPE_HARD:
            return False
        if h5py.h5o.get_info(gid, name).type != h5py.h5o.TYPE_DATASET:
            return False
    return True


def _decoded(name: bytes, f: h5py.File, prefix: str) -> str:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(
            f"{f.filename!r}: the link {name!r} in /{prefix} is not UTF-8 (a damaged file?)"
        ) from None


def _dataset_node(
    kind: str, own: frozenset[str], n_attrs: int, ds: h5py.Dataset, *more: h5py.Dataset
) -> Node:
    files = tuple(dict.fromkeys(n for d in (ds, *more) for n in other_files(d) if n not in own))
    size = ds.id.get_storage_size()
    try:
        dtype = ds.dtype
    except (TypeError, ValueError) as exc:  # h5py has no numpy type for it
        raise FileFormatError(f"{ds.file.filename!r}, {ds.name!r}: its HDF5 type: {exc}") from None
    return Node(kind, ds.shape, dtype, ds.chunks, ds.compression, size, files, n_attrs=n_attrs)
