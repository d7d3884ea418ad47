"""Serving typed files to PyTorch: batch items, getters and ``serve()``.

A *batch* is any nesting of dicts, tuples and lists whose leaves are
:class:`Input` and :class:`Target` items. Each item names a feature (a path or a
proxy) and a getter that maps an item index to a region of the feature's
concatenation. :class:`ProgrammableDataset` turns a batch into a map-style
dataset whose samples have the batch's shape; :func:`serve` wraps it in a
:class:`torch.utils.data.DataLoader`.

Reads go straight to h5py: each process (the main one, every DataLoader
worker) opens each file once, read-only, keeps it open and caches its h5py
datasets. When the DataLoader asks for a whole batch, the regions are sorted
and neighbours are coalesced into single reads. Nothing here imports torch
until :func:`serve` or ``to_tensor=True`` needs it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.dtypes import StringDType

from . import format as fmt
from .handle import FileHandle
from .proxy import DatasetProxy

if TYPE_CHECKING:
    from .typed_file import TypedFile

__all__ = [
    "AsFramedSlice",
    "AsSlice",
    "GetId",
    "Getter",
    "Input",
    "ProgrammableDataset",
    "Target",
    "serve",
]

TORCH_HINT = "serving to PyTorch needs torch: pip install h5dask[torch]"
GAP_BYTES = 64 << 10  # regions closer than this are read together


def require_torch() -> Any:
    """Import torch, or raise an ImportError saying how to install it."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(TORCH_HINT) from exc
    return torch


# -- getters -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Getter:
    """Item ``k`` of an id is row ``k`` of its array (of a plain dataset: of the dataset).

    A getter counts the items of each region (an id's array, or a whole plain
    dataset) and says which steps along :attr:`dim` each item spans.

    Examples
    --------
    >>> import h5dask as h5m
    >>> item = h5m.Input(key="data/labels", getter=h5m.Getter())
    """

    dim = 0

    def n_items(self, extent: Any) -> Any:
        """Items of regions of ``extent`` steps along :attr:`dim`; None for one a region
        whatever other getters count (the whole region, repeated)."""
        return extent

    def spans(self, k: Any, extent: Any) -> tuple[Any, Any]:
        """``[start, stop)`` along :attr:`dim` of item ``k`` of a region of ``extent``
        steps, relative to the region (ints or arrays alike)."""
        return k, k + 1

    def finish(self, data: np.ndarray, pad: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Shape the region read for one item; ``pad`` steps fell off the data's edges."""
        return data[0]


@dataclass(frozen=True)
class GetId(Getter):
    """Item ``i`` is the whole array of the ``i``-th id served.

    Examples
    --------
    >>> import h5dask as h5m
    >>> item = h5m.Input(key="data/images", getter=h5m.GetId())
    """

    def n_items(self, extent: Any) -> Any:
        return None

    def spans(self, k: Any, extent: Any) -> tuple[Any, Any]:
        return k * 0, extent

    def finish(self, data: np.ndarray, pad: tuple[int, int] = (0, 0)) -> np.ndarray:
        return data


@dataclass(frozen=True)
class AsSlice(Getter):
    """Item ``k`` of an id is a window of ``length`` steps along ``dim`` of its array.

    The window of item ``k`` starts at ``k * downsampling + shift``; the items
    are every window that fits in the array, so a window never spans two ids
    (of a plain dataset: every window that fits in the dataset). Two items with
    the same ``length`` and shifts ``0`` and ``1`` give next-step prediction pairs.

    Parameters
    ----------
    dim : int
        Axis of the windows.
    shift : int
        Offset of every window, in steps (``>= 0``).
    length : int
        Steps a window spans.
    downsampling : int
        Steps between the starts of consecutive items.

    Examples
    --------
    >>> import h5dask as h5m
    >>> x = h5m.Input(key="signal", getter=h5m.AsSlice(length=1024, downsampling=256))
    >>> y = h5m.Target(key="signal", getter=h5m.AsSlice(shift=1, length=1024, downsampling=256))
    """

    dim: int = 0
    shift: int = 0
    length: int = 1
    downsampling: int = 1

    def __post_init__(self) -> None:
        for name in ("dim", "shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{type(self).__name__}: {name} must be >= 0")
        for name in ("length", "downsampling"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be >= 1")

    def window(self) -> tuple[int, int]:
        """Offset and width of every window, in steps along :attr:`dim`."""
        return self.shift, self.length

    def margins(self) -> tuple[int, int]:
        """Steps read before and after every window (they may fall off the data)."""
        return 0, 0

    def n_items(self, extent: Any) -> Any:
        offset, width = self.window()
        return np.maximum(0, (extent - offset - width) // self.downsampling + 1)

    def spans(self, k: Any, extent: Any) -> tuple[Any, Any]:
        (offset, width), (before, after) = self.window(), self.margins()
        start = k * self.downsampling + offset
        return start - before, start + width + after

    def finish(self, data: np.ndarray, pad: tuple[int, int] = (0, 0)) -> np.ndarray:
        return data


@dataclass(frozen=True)
class AsFramedSlice(AsSlice):
    """Item ``k`` of an id is ``length`` frames of ``frame_size`` steps, ``hop_length`` apart.

    The frames of item ``k`` start at step ``k * downsampling + shift * hop_length``
    of the id's array and the items are every window that fits in it. With
    ``center``, the frames' centres are there instead (frame ``j`` spans
    ``[c - frame_size // 2, c - frame_size // 2 + frame_size)``), items run while
    the last centre is in the array, and steps before or after the array (never
    another id's) are padded with ``pad_mode``
    as :func:`numpy.pad` does, like ``librosa.stft(center=True)``. The frame
    axis replaces ``dim`` and a last axis of ``frame_size`` is added.

    Parameters
    ----------
    dim : int
        Axis to frame.
    shift : int
        Offset of every item, in frames.
    length : int
        Frames an item holds.
    frame_size, hop_length : int
        Steps a frame spans, and between consecutive frames.
    center : bool
        Centre frames on their steps, padding past the data's edges.
    pad_mode : str
        :func:`numpy.pad` mode of ``center``.
    downsampling : int
        Steps between the starts of consecutive items.

    Examples
    --------
    >>> import h5dask as h5m
    >>> g = h5m.AsFramedSlice(length=16, frame_size=512, hop_length=128, downsampling=128)
    >>> g.window()
    (0, 2432)
    """

    frame_size: int = 1
    hop_length: int = 1
    center: bool = False
    pad_mode: str = "reflect"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("frame_size", "hop_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"AsFramedSlice: {name} must be >= 1")

    def window(self) -> tuple[int, int]:
        edge = 1 if self.center else self.frame_size
        return self.shift * self.hop_length, (self.length - 1) * self.hop_length + edge

    def margins(self) -> tuple[int, int]:
        half = self.frame_size // 2
        return (half, self.frame_size - half - 1) if self.center else (0, 0)

    def finish(self, data: np.ndarray, pad: tuple[int, int] = (0, 0)) -> np.ndarray:
        if pad != (0, 0):
            widths = [(0, 0)] * data.ndim
            widths[self.dim] = pad
            data = np.pad(data, widths, mode=self.pad_mode)
        frames = np.lib.stride_tricks.sliding_window_view(data, self.frame_size, axis=self.dim)
        step = (slice(None),) * self.dim + (slice(None, None, self.hop_length),)
        return np.ascontiguousarray(frames[step])


# -- batch items -------------------------------------------------------------------------------


@dataclass
class Input:
    """One leaf of a batch: what to read, how, and what to do with it.

    Parameters
    ----------
    key : str or DatasetProxy
        A feature's path (``"data/images"``) or its proxy.
    getter : Getter
        Maps an item index to a region: :class:`Getter`, :class:`GetId`,
        :class:`AsSlice`, :class:`AsFramedSlice`.
    transform : callable, optional
        Applied to each item's data (after ``to_tensor``).
    to_tensor : bool
        Turn each item's array into a :class:`torch.Tensor` in the worker.
    data : str or DatasetProxy, optional
        h5mapper's name for ``key``.
    setter : Setter, optional
        h5mapper's writer of values into the item's feature (:class:`~h5dask.Setter`).

    Examples
    --------
    >>> import h5dask as h5m
    >>> batch = dict(x=h5m.Input(key="data/images", getter=h5m.GetId()),
    ...              y=h5m.Target(key="data/labels", getter=h5m.GetId()))
    """

    key: str | DatasetProxy | None = None
    getter: Getter = field(default_factory=Getter)
    transform: Callable[[Any], Any] | None = None
    to_tensor: bool = False
    data: str | DatasetProxy | None = field(default=None, kw_only=True, repr=False)
    setter: Any = field(default=None, kw_only=True, repr=False)

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = self.data
        if not isinstance(self.key, (str, DatasetProxy)):
            raise TypeError(
                f"{type(self).__name__} takes key= a feature path or a DatasetProxy, "
                f"not {type(self.key).__name__}"
            )
        if not isinstance(self.getter, Getter):
            raise TypeError(f"{type(self).__name__}({self.key!r}): getter must be a Getter")


@dataclass
class Target(Input):
    """A batch leaf for what the model should predict; reads as :class:`Input` does."""


# -- reading -----------------------------------------------------------------------------------


class _Reader:
    """This process's read-only handles, one per file, kept open, their datasets cached.

    Each is a :class:`~h5dask.handle.FileHandle` with ``keep_open``: it opens on
    first use in whichever process reads (a DataLoader worker), and never
    touches a handle inherited through fork.
    """

    def __init__(self) -> None:
        self._handles: dict[str, FileHandle] = {}

    def dataset(
        self, filename: str, path: str, h5_kwargs: dict[str, Any], allow_external: bool
    ) -> Any:
        handle = self._handles.get(filename)
        if handle is None:
            handle = FileHandle(filename, "r", True, allow_external, **h5_kwargs)
            self._handles[filename] = handle
        return handle.reader(path)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # handles stay in their process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


class _Leaf:
    """An item bound to its file: the dataset to read and its regions, one per id served."""

    def __init__(self, item: Input, file: TypedFile | None):
        proxy = self.proxy = _proxy(item, file)
        self.name = f"{type(item).__name__}({proxy.path!r}, {type(item.getter).__name__})"
        if not proxy.exists:
            raise ValueError(f"{self.name}: {proxy.file.filename!r} holds no data for it")
        if isinstance(item.getter, GetId) and not proxy.has_refs:
            raise ValueError(f"{self.name}: {proxy.path!r} is a plain dataset with no ids")
        if item.getter.dim >= len(proxy.shape):
            raise ValueError(f"{self.name}: dim={item.getter.dim} but the data is {proxy.shape}")
        proxy.file.flush()
        self.filename = proxy.file.filename
        self.h5_kwargs = proxy.file._handle.h5_kwargs
        self.allow_external = proxy.file.allow_external
        proxy.file._check_local(proxy.path)  # here, not in each worker
        self.path = proxy.values_path
        self.getter = item.getter
        self.dim = item.getter.dim
        self.clips = isinstance(item.getter, AsSlice) and item.getter.margins() != (0, 0)
        self.row_bytes = max(1, int(np.prod(proxy.shape[1:]))) * proxy.dtype.itemsize
        self.post = tuple(getattr(proxy.feature, "__t__", ()))
        self.transform = item.transform
        self.to_tensor = item.to_tensor
        self.regions = np.array([[0, proxy.shape[0]]], dtype=np.int64)  # see serve_regions

    def serve_regions(self, regions: np.ndarray) -> np.ndarray | None:
        """Read the ``[start, stop)`` rows ``regions`` (one per id served); return how
        many items each holds (None: one, whatever the others count)."""
        self.regions = regions
        self.extent = self.proxy.shape[self.dim] if self.dim else None
        return self.getter.n_items(self._extent(regions[:, 0], regions[:, 1]))

    def _extent(self, lo: Any, hi: Any) -> Any:
        return hi - lo if self.extent is None else self.extent

    def get(self, reader: _Reader, j: int, k: int, jitter: int = 0) -> Any:
        """Item ``k`` of the ``j``-th region (its window moved by ``jitter`` steps)."""
        lo, hi = self.regions[j].tolist()
        extent = self._extent(lo, hi)
        start, stop = self.getter.spans(k, extent)
        if jitter:
            shift = int(self._shift(start, stop, extent, jitter))
            start, stop = start + shift, stop + shift
        pad = (max(0, -start), max(0, stop - extent)) if self.clips else (0, 0)
        start, stop = start + pad[0], stop - pad[1]
        if self.dim == 0:
            return self._finish(self._rows(reader, slice(lo + start, lo + stop)), pad)
        window = (slice(None),) * (self.dim - 1) + (slice(start, stop),)
        return self._finish(self._rows(reader, (slice(lo, hi), *window)), pad)

    def _rows(self, reader: _Reader, item: Any) -> np.ndarray:
        """``item`` of the dataset, read with this process's handle (h5py's errors on a
        damaged file converted; transforms run outside)."""
        with fmt.reading(self.filename):
            ds = reader.dataset(self.filename, self.path, self.h5_kwargs, self.allow_external)
            return ds[item]

    def get_many(
        self, reader: _Reader, js: np.ndarray, ks: np.ndarray, jitter: np.ndarray | None = None
    ) -> list[Any]:
        """Items ``ks`` of the regions ``js``, read sorted and coalesced along axis 0."""
        if self.dim:
            moves = [0] * len(js) if jitter is None else jitter.tolist()
            triples = zip(js.tolist(), ks.tolist(), moves, strict=True)
            return [self.get(reader, j, k, m) for j, k, m in triples]
        lo, hi = self.regions[js, 0], self.regions[js, 1]
        starts, stops = self.getter.spans(ks, hi - lo)
        if jitter is not None:
            shifts = self._shift(starts, stops, hi - lo, jitter)
            starts, stops = starts + shifts, stops + shifts
        starts, stops = lo + starts, lo + stops
        if not self.clips:
            return [self._finish(data) for data in self._read_spans(reader, starts, stops)]
        before, after = np.maximum(0, lo - starts), np.maximum(0, stops - hi)
        blocks = self._read_spans(reader, starts + before, stops - after)
        pads = zip(before.tolist(), after.tolist(), strict=True)
        return [self._finish(data, pad) for data, pad in zip(blocks, pads, strict=True)]

    def _shift(self, start: Any, stop: Any, extent: Any, jitter: Any) -> Any:
        """h5mapper's ``sampling_jitter``: an :class:`AsSlice` window moves by ``jitter``
        steps, clipped so that its data stays within ``[0, extent)``; other items stay."""
        if not isinstance(self.getter, AsSlice):
            return 0 * jitter
        before, after = self.getter.margins()
        return np.clip(jitter, -(start + before), extent - (stop - after))

    def _read_spans(
        self, reader: _Reader, starts: np.ndarray, stops: np.ndarray
    ) -> list[np.ndarray]:
        """Read sorted, coalesced blocks; each item is a copy cut from its block."""
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], stops[order]
        reach = np.maximum.accumulate(e)
        new = np.ones(len(s), dtype=bool)
        new[1:] = s[1:] > reach[:-1] + GAP_BYTES // self.row_bytes
        firsts = np.flatnonzero(new)
        block_of = np.cumsum(new) - 1
        bounds = zip(s[firsts].tolist(), np.maximum.reduceat(e, firsts).tolist(), strict=True)
        blocks = [self._rows(reader, slice(a, b)) for a, b in bounds]
        shared = np.bincount(block_of) > 1
        base = s[firsts].tolist()
        out: list[Any] = [None] * len(s)
        for k, a, b, j in zip(
            order.tolist(), s.tolist(), e.tolist(), block_of.tolist(), strict=True
        ):
            data = blocks[j]
            if shared[j]:
                data = data[a - base[j] : b - base[j]].copy()
            out[k] = data
        return out

    def _finish(self, data: Any, pad: tuple[int, int] = (0, 0)) -> Any:
        data = reduce(lambda x, t: t(x), self.post, self.getter.finish(data, pad))
        if self.to_tensor:
            data = _to_tensor(data, self.name)
        return data if self.transform is None else self.transform(data)


def _proxy(item: Input, file: TypedFile | None) -> DatasetProxy:
    if isinstance(item.key, DatasetProxy):
        return item.key
    if file is None:
        raise ValueError(f"{type(item).__name__}(key={item.key!r}) needs a file to read from")
    proxy = file.get_proxy(item.key)
    if not isinstance(proxy, DatasetProxy):
        raise ValueError(
            f"{type(item).__name__}(key={item.key!r}): that is a group of {file.filename!r}; "
            "name one of its features"
        )
    return proxy


def _without(shape: tuple[int, ...], dim: int) -> tuple[int, ...]:
    return shape[:dim] + shape[dim + 1 :]


def _to_tensor(data: Any, name: str) -> Any:
    torch = require_torch()
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "biufc":
        raise TypeError(f"{name}: to_tensor needs a numeric array, not {type(data).__name__}")
    return torch.from_numpy(data)


# -- batch structure ---------------------------------------------------------------------------


class _Slot:
    """Where a leaf's value goes in the rebuilt batch."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


def _flatten(batch: Any, items: list[Input]) -> Any:
    """The batch with its items replaced by slots; ``items`` collects them in order."""
    if isinstance(batch, Input):
        items.append(batch)
        return _Slot(len(items) - 1)
    if isinstance(batch, Mapping):
        return {key: _flatten(value, items) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_flatten(value, items) for value in batch))
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return type(batch)(_flatten(value, items) for value in batch)
    return batch


def _rebuild(template: Any, values: Sequence[Any]) -> Any:
    kind = type(template)
    if kind is _Slot:
        return values[template.index]
    if kind is dict:
        return {key: _rebuild(value, values) for key, value in template.items()}
    if kind is tuple or kind is list:
        return kind(_rebuild(value, values) for value in template)
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return kind(*(_rebuild(value, values) for value in template))
    return template


# -- pairing by id -----------------------------------------------------------------------------


def _pair_by_id(leaves: list[_Leaf], ids: Any) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """The ids to serve and each leaf's ``[start, stop)`` rows of them, in that order."""
    plain = [leaf for leaf in leaves if not leaf.proxy.has_refs]
    if plain:
        if len(plain) < len(leaves):
            other = next(leaf for leaf in leaves if leaf.proxy.has_refs)
            raise ValueError(
                f"{plain[0].name}: a plain dataset has no ids to pair its items with those "
                f"of {other.name}; serve plain datasets alone (they pair by position)"
            )
        if ids is not None:
            raise ValueError(f"{plain[0].name}: ids= needs features; this is a plain dataset")
        return None, [leaf.regions for leaf in leaves]
    if isinstance(ids, str) and ids != SHARED:
        raise ValueError(f"ids= takes a sequence of ids or {SHARED!r}, not {ids!r}")
    if ids is None or ids == SHARED:
        return _ids_of_features(leaves, ids == SHARED)
    served = np.asarray(list(ids), dtype=StringDType())
    if not len(served):
        raise ValueError("ids=[]: no id to serve")
    return served, [_regions_of(leaf, served, "asked for") for leaf in leaves]


def _ids_of_features(leaves: list[_Leaf], shared: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every feature's ids (which must be the same), or those they all hold."""
    first = leaves[0].proxy.file
    masks = [_presence(leaf, first) for leaf in leaves]
    at = np.flatnonzero((np.logical_and if shared else np.logical_or).reduce(masks))
    served = first.index.ids[at]
    if shared and not len(served):
        raise ValueError(f"ids='shared': the features {_names(leaves)} share no id")
    which = "" if shared else "the batch's features hold"
    regions = []
    for leaf in leaves:
        same = leaf.proxy.file.filename == first.filename
        regions.append(_regions_of(leaf, served, which, at if same else None, hint=not shared))
        extra = int((leaf.proxy.refs.array[:, 0] >= 0).sum()) - len(served)
        if not shared and extra > 0:  # ids of another file that the first one lacks
            raise ValueError(
                f"{leaf.name} of {leaf.filename!r} has data for {extra} ids that "
                f"{first.filename!r} does not hold: items pair by id; pass ids=[...] to "
                "choose the ids to serve"
            )
    return served, regions


def _presence(leaf: _Leaf, file: TypedFile) -> np.ndarray:
    """Whether ``leaf`` has data for each id of ``file``."""
    table = leaf.proxy.refs.array
    if leaf.proxy.file.filename == file.filename:
        return table[:, 0] >= 0
    at = leaf.proxy.file.index.positions(file.index.ids)
    return (at >= 0) & (table[at, 0] >= 0)


def _regions_of(
    leaf: _Leaf, ids: np.ndarray, which: str, at: np.ndarray | None = None, hint: bool = False
) -> np.ndarray:
    """The rows of each of ``ids`` (at positions ``at`` of its file) in ``leaf``'s feature;
    an error naming the ids it lacks."""
    table = leaf.proxy.refs.array
    at = leaf.proxy.file.index.positions(ids) if at is None else at
    lacking = (at < 0) | (table[at, 0] < 0)
    if lacking.any():
        some = ", ".join(repr(str(id)) for id in ids[lacking][:3])
        more = "; pass ids='shared' to serve the ids every feature has, or ids=[...]" * hint
        raise ValueError(
            f"{leaf.name} of {leaf.filename!r} has no data for {int(lacking.sum())} of the "
            f"{len(ids)} ids {which} (e.g. {some}): items pair by id{more}"
        )
    return np.ascontiguousarray(table[at])


def _names(leaves: list[_Leaf]) -> str:
    return ", ".join(leaf.name for leaf in leaves)


# -- the dataset -------------------------------------------------------------------------------


SHARED = "shared"


class ProgrammableDataset:
    """A map-style dataset whose samples have the shape of ``batch``, paired by id.

    Every item of a sample comes from the same source id: each item reads the
    region of that id in its feature, never the i-th region of its own. By
    default every feature of the batch must hold data for the same ids, and a
    batch whose features cover different ids is a ``ValueError`` naming the
    feature that lacks ids, how many and which; ``ids="shared"`` serves the ids
    every feature holds, ``ids=[...]`` the ids given, in that order.

    Each id gives as many samples as its fewest items: one for :class:`GetId`
    alone, every window that fits in the id's array for :class:`AsSlice` (an id
    shorter than a window gives none), every row for :class:`Getter`; a
    :class:`GetId` item beside windows repeats the id's whole array. Plain
    datasets of foreign files (no ids) are served alone, by position.
    It pickles without any open file, so DataLoader workers (fork, spawn or
    forkserver) each open their own read-only handle.

    Parameters
    ----------
    file : TypedFile or None
        The file that ``key=`` paths name (None if every key is a proxy).
    batch : dict, tuple, list or Input
        Any nesting of them, with Input/Target leaves.
    ids : sequence of str or "shared", optional
        The ids to serve (each must have data in every feature), or
        ``"shared"``: those every feature has. Default: every feature's ids,
        which must be the same.
    sampling_jitter : int
        Move the window of each :class:`AsSlice` item of a sample by one random
        number of steps in ``[-sampling_jitter, sampling_jitter)``, kept within
        its region (h5mapper's option).

    Attributes
    ----------
    ids : numpy.ndarray or None
        The ids served, in order (None for plain datasets).

    Raises
    ------
    ValueError
        Features that cover different ids (with ``ids`` unset), an id given
        that a feature has no data for, or a plain dataset beside features.

    Examples
    --------
    >>> import os, tempfile, numpy as np, h5dask as h5m
    >>> class Logs(h5m.TypedFile):
    ...     loss = h5m.Array()
    ...     step = h5m.Array()
    >>> logs = Logs(os.path.join(tempfile.mkdtemp(), "logs.h5"), mode="w")
    >>> _ = logs.add("a", {"loss": np.arange(3.0)}).add("b", {"loss": np.arange(2.0)})
    >>> _ = logs.add("b", {"step": np.array([7])})
    >>> ds = h5m.serve.ProgrammableDataset(logs, {"x": h5m.Input("loss", h5m.GetId())})
    >>> len(ds), ds[1]
    (2, {'x': array([0., 1.])})
    >>> batch = {"x": h5m.Input("loss", h5m.GetId()), "y": h5m.Target("step", h5m.GetId())}
    >>> ds = h5m.serve.ProgrammableDataset(logs, batch, ids="shared")
    >>> ds.ids.tolist(), ds[0]
    (['b'], {'x': array([0., 1.]), 'y': array([7])})
    """

    def __init__(
        self,
        file: TypedFile | None,
        batch: Any,
        ids: Sequence[str] | str | None = None,
        sampling_jitter: int = 0,
    ):
        if sampling_jitter < 0:
            raise ValueError(f"sampling_jitter must be >= 0, not {sampling_jitter}")
        self.jitter = int(sampling_jitter)
        items: list[Input] = []
        self.file = file
        self.template = _flatten(batch, items)
        if not items:
            raise ValueError("the batch holds no Input or Target item")
        self.leaves = [_Leaf(item, file) for item in items]
        self.ids, regions = _pair_by_id(self.leaves, ids)
        counts = [leaf.serve_regions(r) for leaf, r in zip(self.leaves, regions, strict=True)]
        counted = [np.broadcast_to(c, len(regions[0])) for c in counts if c is not None]
        per_region = np.minimum.reduce(counted) if counted else np.ones(len(regions[0]), int)
        self._starts = np.concatenate([[0], np.cumsum(per_region)]).astype(np.int64)
        self._one_each = bool((per_region == 1).all())  # item i is region i's
        self.length = int(self._starts[-1])
        self._reader = _Reader()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        i = self._check(i)
        j, k = (i, 0) if self._one_each else self._locate(i)
        jitter = random.randrange(-self.jitter, self.jitter) if self.jitter else 0
        return _rebuild(
            self.template, [leaf.get(self._reader, j, k, jitter) for leaf in self.leaves]
        )

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Many samples at once, reading each item's regions sorted and coalesced."""
        items = np.asarray(indices, dtype=np.int64)
        if len(items) and (items.min() < -self.length or items.max() >= self.length):
            raise IndexError(f"indices out of range for a dataset of {self.length} items")
        items = np.where(items < 0, items + self.length, items)
        js, ks = (items, items * 0) if self._one_each else self._locate(items)
        jitter = None
        if self.jitter:  # Python's random: DataLoader seeds it in each worker, numpy's not
            jitter = np.array([random.randrange(-self.jitter, self.jitter) for _ in items])
        columns = [leaf.get_many(self._reader, js, ks, jitter) for leaf in self.leaves]
        return [_rebuild(self.template, values) for values in zip(*columns, strict=True)]

    def _locate(self, items: Any) -> tuple[Any, Any]:
        """The region and the item within it of each sample index."""
        js = np.searchsorted(self._starts, items, side="right") - 1
        return js, items - self._starts[js]

    def _check(self, i: int) -> int:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of {self.length} items")
        return int(i) + self.length if i < 0 else int(i)

    def close(self) -> None:
        """Close this process's read handles (they reopen on the next read)."""
        self._reader.close()

    def __repr__(self) -> str:
        names = ", ".join(leaf.name for leaf in self.leaves)
        return f"<ProgrammableDataset of {self.length} items: {names}>"


def serve(
    file: TypedFile | None,
    batch: Any,
    ids: Sequence[str] | str | None = None,
    sampling_jitter: int = 0,
    **loader_kwargs: Any,
) -> Any:
    """A :class:`torch.utils.data.DataLoader` of batches shaped like ``batch``.

    The items of a sample come from one source id (see :class:`ProgrammableDataset`).

    Parameters
    ----------
    file : TypedFile or None
        The file that ``key=`` paths name.
    batch : dict, tuple, list or Input
        Any nesting of them, with :class:`Input` / :class:`Target` leaves.
    ids : sequence of str or "shared", optional
        The ids to serve, or ``"shared"``: those every feature of the batch
        holds. Default: every feature's ids, which must be the same.
    sampling_jitter : int
        See :class:`ProgrammableDataset`.
    **loader_kwargs
        Passed to the DataLoader (``batch_size``, ``shuffle``, ``num_workers``,
        ``multiprocessing_context``...).

    Raises
    ------
    ImportError
        torch is not installed (``pip install h5dask[torch]``).
    ValueError
        The features cover different ids and ``ids`` is unset, or a feature
        has no data for an id of ``ids``; the message names them.

    Examples
    --------
    >>> loader = exp.serve(dict(x=h5m.Input(key="data/images", getter=h5m.GetId()),
    ...                         y=h5m.Target(key="data/labels", getter=h5m.GetId())),
    ...                    batch_size=32, shuffle=True, num_workers=2)  # doctest: +SKIP
    """
    torch = require_torch()
    dataset = ProgrammableDataset(file, batch, ids, sampling_jitter)
    return torch.utils.data.DataLoader(dataset, **loader_kwargs)
