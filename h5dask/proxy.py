"""Proxies: the user-facing views of a typed file's groups and features.

A proxy holds its file and a path, never an h5py object, so it pickles and
works in any process. Reading ``file.data.images`` gives a :class:`DatasetProxy`
for a feature (read it by id, by ref, or with any h5py item on the
concatenation) and a :class:`GroupProxy` for a group (read it by id).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial, reduce
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from . import format as fmt
from .display import html_table
from .errors import H5DaskError, StaleFileError, UnknownIdError
from .extract import normalize

if TYPE_CHECKING:
    from .feature import Feature
    from .typed_file import TypedFile

__all__ = ["Proxy", "GroupProxy", "DatasetProxy", "RefTable"]


class Proxy:
    """Common base of group and dataset proxies.

    Attributes the proxy itself does not have are looked up on its feature, so
    a feature's custom methods (``plot``, ``decode``...) are reachable here.
    """

    is_group = False

    def __init__(self, file: TypedFile, path: str, feature: Feature | None = None):
        self.file = file
        self.path = path
        self.feature = feature

    @property
    def owner(self) -> TypedFile:
        """The file this proxy belongs to (h5mapper's name for :attr:`file`)."""
        return self.file

    def handle(self, mode: str | None = None) -> h5py.File:
        """The file's open :class:`h5py.File`; see :meth:`TypedFile.handle`."""
        return self.file.handle(mode)

    @property
    def h5_(self) -> h5py.Group | h5py.Dataset:
        """The h5py object behind this proxy: its group, or the dataset of a feature's values.

        Opened through :meth:`handle`: with ``keep_open`` the kept file, else a
        new handle that stays open as long as the object lives.
        """
        return self.handle()[getattr(self, "values_path", self.path) or "/"]

    def flush(self) -> None:
        """Commit the file's buffered writes; see :meth:`TypedFile.flush`."""
        self.file.flush()

    def close(self) -> None:
        """Close the file's kept handle; see :meth:`TypedFile.close`."""
        self.file.close()

    def serve(self, batch: Any, **loader_kwargs: Any) -> Any:
        """A DataLoader over the file; see :meth:`TypedFile.serve`."""
        return self.file.serve(batch, **loader_kwargs)

    @property
    def name(self) -> str:
        """The HDF5 name, e.g. ``"/data/images"``."""
        return "/" + self.path

    @property
    def attrs(self) -> dict[str, Any]:
        """The HDF5 attributes of this group or feature, decoded."""
        return self.file._attrs(self.path)

    def _check_id(self, id: Any) -> str:
        if isinstance(id, (int, np.integer)) and not isinstance(id, bool):
            ids = self.file.index.ids
            if not -len(ids) <= id < len(ids):
                raise UnknownIdError(id, self.file.filename, self.path)
            return str(ids[id])
        if not isinstance(id, str):
            raise TypeError(f"ids are str (or the int position of an id), not {type(id).__name__}")
        return id

    def __getattr__(self, name: str) -> Any:
        feature = self.__dict__.get("feature")
        if feature is not None and not name.startswith("__") and hasattr(feature, name):
            if "_restored" not in self.__dict__:
                self._restored = feature.restored(self.attrs)
            return getattr(self._restored, name)
        path = self.__dict__.get("path")  # absent while unpickling
        raise AttributeError(f"{type(self).__name__} {path!r} has no attribute {name!r}")

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and other.file is self.file  # type: ignore[attr-defined]
            and other.path == self.path  # type: ignore[attr-defined]
        )

    def __hash__(self) -> int:
        return hash((id(self.file), self.path))

    def _repr_html_(self) -> str:
        return html_table(self.file, path=self.path)


class GroupProxy(Proxy):
    """A group of features: read and write by id, reach members as attributes.

    Examples
    --------
    ``file.logs.get("train")`` and ``file.logs["train"]`` return a dict of the
    members that hold data for ``"train"``; ``file.logs.loss`` is a member.
    """

    is_group = True

    @property
    def sources(self) -> np.ndarray:
        """The ids that hold data in any member, in file order."""
        ids = self.file.index.ids
        has = np.zeros(len(ids), dtype=bool)
        for child in self.children.values():
            if isinstance(child, GroupProxy):
                has |= np.isin(ids, child.sources)
            elif child.has_refs and child.exists:
                has |= child.refs.array[:, 0] >= 0
        return ids[has]

    def iset(self, id: str, idx: Any, data: dict[str, Any]) -> None:
        """:meth:`DatasetProxy.iset` on each member named by ``data``."""
        if not isinstance(data, dict):
            raise TypeError(
                f"iset() on group {self.path!r} takes a dict, not {type(data).__name__}"
            )
        for name, value in data.items():
            if name not in self.keys():
                raise KeyError(f"group {self.path!r} has no member {name!r}")
            self.file.get_proxy(self._child(name)).iset(id, idx, value)

    @property
    def children(self) -> dict[str, Proxy]:
        """The members of this group, by name."""
        return {name: self.file.get_proxy(self._child(name)) for name in self.keys()}

    def keys(self) -> list[str]:
        """Names of the members: declared ones first, then those found in the file."""
        return self.file._children(self.path)

    def _child(self, name: str) -> str:
        return f"{self.path}/{name}" if self.path else name

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_") and name in self.keys():
            return self.file.get_proxy(self._child(name))
        return super().__getattr__(name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.keys()))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return name in self.keys()

    def get(self, id: str | int) -> dict[str, Any]:
        """The data of ``id`` in every member that has some, as a nested dict.

        Raises
        ------
        UnknownIdError
            The file holds no such id.
        """
        id = self._check_id(id)
        if id not in self.file.index:
            raise UnknownIdError(id, self.file.filename, self.path)
        out = {}
        for name, child in self.children.items():
            if isinstance(child, DatasetProxy) and not child.has_refs:
                continue  # a plain dataset of a foreign file has no data by id
            value = child.get(id)
            if value is not None and not (isinstance(value, dict) and not value):
                out[name] = value
        if not out:  # no data for this id: nothing to transform
            return out
        transforms = getattr(self.feature, "__grp_t__", ())
        return reduce(lambda data, t: t(data), transforms, out)

    def __getitem__(self, id: str | int) -> dict[str, Any]:
        return self.get(id)

    def __setitem__(self, id: str, data: dict[str, Any]) -> None:
        self.set(id, data)

    def add(self, id: str, data: dict[str, Any]) -> GroupProxy:
        """Add ``data`` (a dict by member name) for ``id``, a new id or a known one without
        data in these members yet (see :meth:`TypedFile.add`)."""
        self.file._add(self._check_id(id), self._nest(data))
        return self

    def append(self, id: str, data: dict[str, Any]) -> GroupProxy:
        """Append rows to the arrays of ``id`` in these members, e.g.
        ``file.logs.append("train", {"loss": step_loss})`` (see :meth:`TypedFile.append`)."""
        self.file._add(self._check_id(id), self._nest(data), "append")
        return self

    def set(self, id: str, data: dict[str, Any]) -> None:
        """Replace the data of ``id`` in the members named by ``data``; add a new id."""
        id = self._check_id(id)
        if not isinstance(data, dict):
            raise TypeError(f"set() on group {self.path!r} takes a dict, not {type(data).__name__}")
        if id not in self.file.index:
            self.file._add(id, self._nest(data), "set")
            return
        for name, value in data.items():
            if name in self.keys():
                self.file.get_proxy(self._child(name)).set(id, value)
            else:
                self.file._add(id, self._nest({name: value}), "set")

    def _nest(self, data: Any) -> dict[str, Any]:
        for part in reversed(self.path.split("/") if self.path else []):
            data = {part: data}
        if not isinstance(data, dict):
            raise TypeError(f"add() on the file takes a dict, not {type(data).__name__}")
        return data

    def __repr__(self) -> str:
        return f"<Proxy group {self.name} [{', '.join(self.keys())}] of {self.file.filename!r}>"


class DatasetProxy(Proxy):
    """One feature (or a plain HDF5 dataset): the concatenation of its sources' arrays.

    Any h5py item reads the concatenation (``proxy[:32]``, ``proxy[ref]``); a
    str reads one source (``proxy["planes/01.jpeg"]``), as :meth:`get` does.
    """

    def __init__(self, file: TypedFile, path: str, feature: Feature | None, has_refs: bool):
        super().__init__(file, path, feature)
        self.has_refs = has_refs

    @property
    def values_path(self) -> str:
        """HDF5 path of the dataset holding the concatenation."""
        if not self.has_refs:
            return self.path
        node = self._node
        return f"{self.path}/{fmt.VALUES if node is None else node.values}"

    @property
    def _node(self) -> Any:
        return self.file._layout().get(self.path)

    @property
    def shape(self) -> tuple[int, ...]:
        node = self._node
        return node.shape if node is not None and node.shape is not None else (0,)

    @property
    def dtype(self) -> np.dtype | None:
        node = self._node
        return None if node is None else node.dtype

    @property
    def chunks(self) -> tuple[int, ...] | None:
        node = self._node
        return None if node is None else node.chunks

    @property
    def compression(self) -> str | None:
        node = self._node
        return None if node is None else node.compression

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def exists(self) -> bool:
        """Whether the dataset exists yet (a declared feature may hold no data)."""
        return self._node is not None and self._node.kind != "group"

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def refs(self) -> RefTable:
        """The ref table: ``refs[i]`` is the ``slice`` of the i-th id, or None."""
        if not self.has_refs:
            raise H5DaskError(f"{self.path!r} is a plain dataset with no ref table")
        return RefTable(self)

    @property
    def ids(self) -> np.ndarray:
        """The ids that hold data for this feature, in file order."""
        table = self.refs.array
        return self.file.index.ids[table[:, 0] >= 0]

    @property
    def sources(self) -> np.ndarray:
        """h5mapper's name for :attr:`ids`."""
        return self.ids

    def asstr(self) -> DatasetProxy:
        """This proxy: reads of a string feature give ``str`` already (h5py's ``asstr()``).

        Raises
        ------
        TypeError
            The feature does not hold strings.
        """
        if self.dtype is None or not fmt.is_string_dtype(self.dtype):
            raise TypeError(f"{self.path!r} holds {self.dtype}, not strings: asstr() reads strings")
        return self

    def iset(self, id: str | int, idx: Any, data: Any) -> None:
        """Write ``data`` at ``idx`` (an int, a slice or indices) within the region of ``id``.

        ``proxy.iset("train", 7, loss)`` writes row 7 of ``"train"``'s array in
        place, as ``proxy[proxy.refs["train"]][7] = loss`` would if it wrote
        through; the region neither grows nor moves.

        Raises
        ------
        UnknownIdError
            The file holds no such id.
        IndexError
            ``id`` has no data for this feature, or ``idx`` falls outside its region.
        """
        id = self._check_id(id)
        region = self.refs[id]
        if region is None:
            raise IndexError(f"id {id!r} has no data in feature {self.path!r} to set rows of")
        n = region.stop - region.start
        if isinstance(idx, (int, np.integer)) and not isinstance(idx, bool):
            if not -n <= idx < n:
                raise IndexError(f"row {idx} is outside the {n} rows of {id!r} in {self.path!r}")
            rows: Any = region.start + int(idx) % n
        elif isinstance(idx, slice):
            span = range(n)[idx]
            rows = slice(region.start + span.start, region.start + span.stop, span.step)
        else:
            rows = np.arange(region.start, region.stop)[idx]  # IndexError outside the region
        self[rows] = data

    def compute(
        self,
        fdict: dict[str, Any],
        n_workers: int | None = None,
        parallelism: str = "mp",
        destination: TypedFile | None = None,
    ) -> dict[str, dict[str, Any]] | TypedFile:
        """h5mapper's ``compute``: each function of ``fdict`` on the array of every id.

        Without ``destination``, the results in memory, ``{id: {name: result}}``;
        with one, they are stored there by id (as :meth:`map` does) and it is
        returned. ``parallelism`` is ``"mp"``, ``"threads"`` or ``"none"``.
        """
        from .compat import apply_and_store, for_each
        from .ingest import PARALLELISM

        if parallelism not in ("mp", "threads", "none"):
            raise ValueError(f"parallelism must be 'mp', 'threads' or 'none', not {parallelism!r}")
        if destination is not None:
            return self.map(fdict, destination, n_workers, scheduler=PARALLELISM[parallelism])
        apply = partial(apply_and_store, fdict=fdict, proxy=self)
        ids = [str(id) for id in self.ids]
        return dict(for_each(ids, apply, parallelism, n_workers, disable=True))

    def get(self, id: str | int) -> Any:
        """The array of ``id``, or None where it has no data for this feature.

        Raises
        ------
        UnknownIdError
            The file holds no such id.
        """
        id = self._check_id(id)
        for _ in range(3):  # again when another process committed between lookup and read
            position = self.file.index.position(id)
            if position < 0:
                raise UnknownIdError(id, self.file.filename, self.path)
            start, stop = self.refs.array[position].tolist()
            if start < 0:
                return None
            version = self.file._tables_version
            data = self.file._read(self.values_path, slice(start, stop))
            if self.file._tables_version == version:
                return self._transformed(data)
        raise StaleFileError(self.file.filename, self.path, "other processes keep rewriting it")

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, str):
            return self.get(item)
        if not self.exists:
            raise IndexError(f"{self.path!r} holds no data yet")
        self.file._check_local(self.path)
        return self._transformed(self.file._read(self.values_path, item))

    def _transformed(self, data: Any) -> Any:
        transforms = getattr(self.feature, "__t__", ())
        return reduce(lambda x, t: t(x), transforms, data) if transforms else data

    def __setitem__(self, item: Any, value: Any) -> None:
        if isinstance(item, str):
            self.set(item, value)
            return
        self.file._check_writable(f"feature {self.path!r}, item {item!r}")
        self.file._check_local(self.path)
        self.file._write(self.values_path, item, value)

    def set(self, id: str, data: Any) -> None:
        """Replace the array of ``id``: in place when its length is unchanged, else appended."""
        id = self._check_id(id)
        self.file._check_writable(f"source {id!r}, feature {self.path!r}")
        array = normalize(data, id, self.path)
        if isinstance(array, dict):
            raise TypeError(f"{self.path!r} is an array feature; set() takes an array, not a dict")
        position = self.file.index.get(id)
        region = None if position is None else self.refs[position]
        if region is not None and region.stop - region.start == len(array):
            checked = self.file._get_writer().check(id, self.path, array)
            self.file._write(self.values_path, region, checked)
        else:
            self.file._add(id, self._nest(array), "set")

    def add(self, id: str, data: Any) -> DatasetProxy:
        """Add the array of ``id`` to this feature: a new id, or a known one without data
        here yet (see :meth:`TypedFile.add`)."""
        self.file._add(self._check_id(id), self._nest(data))
        return self

    def append(self, id: str, data: Any) -> DatasetProxy:
        """Append rows to the array of ``id`` in this feature (see :meth:`TypedFile.append`)."""
        self.file._add(self._check_id(id), self._nest(data), "append")
        return self

    def _nest(self, data: Any) -> dict[str, Any]:
        for part in reversed(self.path.split("/")):
            data = {part: data}
        return data

    def to_dask(self, id: str | int | None = None, chunks: Any = None) -> Any:
        """A dask array over the concatenation, or over the region of one id.

        Each task opens the file by path in read mode; see :mod:`h5dask.lazy`.

        Parameters
        ----------
        id : str or int, optional
            An id (or its position): the lazy array of that source, or None
            where it has no data for this feature.
        chunks : int or dask chunks, optional
            Rows per block (an int), or any chunks of :func:`dask.array.from_array`.
            Default: whole multiples of the HDF5 chunks, about dask's
            ``array.chunk-size``.

        Examples
        --------
        >>> file.data.images.to_dask().mean().compute()  # doctest: +SKIP
        """
        from .lazy import to_dask

        return to_dask(self, id, chunks)

    def to_bag(self, npartitions: int | None = None, ids_per_partition: int | None = None) -> Any:
        """A dask bag of ``(id, array)`` for every id with data, many ids per partition.

        Examples
        --------
        >>> file.data.sound.to_bag().map(lambda kv: kv[1].std()).compute()  # doctest: +SKIP
        """
        from .lazy import to_bag

        return to_bag(self, npartitions, ids_per_partition)

    def map(
        self,
        fdict: dict[str, Any],
        destination: TypedFile | None = None,
        n_workers: int | None = None,
        scheduler: Any = None,
        on_error: str = "raise",
        progress: bool = True,
    ) -> TypedFile:
        """Apply functions to the stored array of every id and store their results.

        Runs as ``create`` does (dask tasks of many ids, one writer, progress,
        ``on_error``, resume: ids whose results are all stored are skipped);
        h5mapper's ``compute``. See :func:`h5dask.lazy.map_sources`.

        Parameters
        ----------
        fdict : dict of str to callable
            Output feature path (``"stats/mean"``) -> function of one id's array.
        destination : TypedFile, optional
            Where results go, by id; default: this file.

        Examples
        --------
        >>> file.data.sound.map({"stats/rms": rms})  # doctest: +SKIP
        """
        from .lazy import map_sources

        return map_sources(self, fdict, destination, n_workers, scheduler, on_error, progress)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        data = np.asarray(self[()])
        return data if dtype is None else data.astype(dtype)

    def __repr__(self) -> str:
        kind = "feature" if self.has_refs else "dataset"
        return (
            f"<Proxy {kind} {self.name} shape={self.shape} dtype={self.dtype} "
            f"of {self.file.filename!r}>"
        )


class RefTable:
    """The ids' regions in a feature's concatenation.

    ``refs[i]`` is ``slice(start, stop)`` for the i-th id, or None where that
    id has no data; a str indexes by id; any other item (``refs[2:5]``,
    ``refs[()]``, a mask) gives a 1-D object array of such slices and Nones, so
    ``refs[()].astype(bool)`` marks the ids with data, as in h5mapper.
    ``refs.array`` (or ``np.asarray``) is the raw ``(n_ids, 2)`` int64 table,
    ``-1`` rows marking absence.
    """

    def __init__(self, proxy: DatasetProxy):
        self.proxy = proxy

    @property
    def array(self) -> np.ndarray:
        return self.proxy.file._refs(self.proxy.path)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, str):
            position = self.proxy.file.index.get(item)
            if position is None:
                raise UnknownIdError(item, self.proxy.file.filename, self.proxy.path)
            item = position
        if isinstance(item, (int, np.integer)):
            start, stop = self.array[item].tolist()
            return None if start < 0 else slice(start, stop)
        rows = self.array if isinstance(item, tuple) and not item else self.array[item]
        if rows.ndim != 2:
            raise IndexError(
                f"refs[{item!r}]: index the ids (axis 0) only; refs.array is the table"
            )
        out = np.empty(len(rows), dtype=object)
        out[:] = [None if a < 0 else slice(a, b) for a, b in rows.tolist()]
        return out

    def __iter__(self) -> Iterator[slice | None]:
        for start, stop in self.array.tolist():
            yield None if start < 0 else slice(start, stop)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self.array if dtype is None else self.array.astype(dtype)

    def __repr__(self) -> str:
        return f"<RefTable of {self.proxy.path!r}: {len(self)} ids>"
