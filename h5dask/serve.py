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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import TYPE_CHECKING, Any

import numpy as np

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
    """Item ``i`` is row ``i`` of the feature's concatenation (``proxy[i]``).

    Examples
    --------
    >>> import h5dask as h5m
    >>> item = h5m.Input(key="data/labels", getter=h5m.Getter())
    """

    dim = 0

    def n_items(self, shape: tuple[int, ...], regions: np.ndarray | None) -> int:
        """Number of items over a dataset of ``shape``."""
        return shape[0]

    def spans(self, items: np.ndarray, regions: np.ndarray | None) -> tuple[np.ndarray, ...]:
        """``[start, stop)`` along :attr:`dim` of each item."""
        return items, items + 1

    def span(self, i: int, regions: np.ndarray | None) -> tuple[int, int]:
        """``[start, stop)`` of one item (the scalar :meth:`spans`)."""
        return i, i + 1

    def finish(self, data: np.ndarray, pad: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Shape the region read for one item; ``pad`` steps fell off the data's edges."""
        return data[0]


@dataclass(frozen=True)
class GetId(Getter):
    """Item ``i`` is the array of the ``i``-th id that has data for the feature.

    Examples
    --------
    >>> import h5dask as h5m
    >>> item = h5m.Input(key="data/images", getter=h5m.GetId())
    """

    def n_items(self, shape: tuple[int, ...], regions: np.ndarray | None) -> int:
        return len(regions)

    def spans(self, items: np.ndarray, regions: np.ndarray | None) -> tuple[np.ndarray, ...]:
        rows = regions[items]
        return rows[:, 0], rows[:, 1]

    def span(self, i: int, regions: np.ndarray | None) -> tuple[int, int]:
        start, stop = regions[i].tolist()
        return start, stop

    def finish(self, data: np.ndarray, pad: tuple[int, int] = (0, 0)) -> np.ndarray:
        return data


@dataclass(frozen=True)
class AsSlice(Getter):
    """Item ``i`` is a window of ``length`` steps along ``dim`` of the concatenation.

    The window of item ``i`` starts at ``i * downsampling + shift``; the items
    are every window that fits. Two items with the same ``length`` and shifts
    ``0`` and ``1`` give next-step prediction pairs.

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

    def n_items(self, shape: tuple[int, ...], regions: np.ndarray | None) -> int:
        if self.dim >= len(shape):
            raise ValueError(f"{type(self).__name__}: dim={self.dim} but the data is {shape}")
        offset, width = self.window()
        return max(0, (shape[self.dim] - offset - width) // self.downsampling + 1)

    def spans(self, items: np.ndarray, regions: np.ndarray | None) -> tuple[np.ndarray, ...]:
        (offset, width), (before, after) = self.window(), self.margins()
        starts = items * self.downsampling + offset
        return starts - before, starts + width + after

    def span(self, i: int, regions: np.ndarray | None) -> tuple[int, int]:
        (offset, width), (before, after) = self.window(), self.margins()
        start = i * self.downsampling + offset
        return start - before, start + width + after

    def finish(self, data: np.ndarray, pad: tuple[int, int] = (0, 0)) -> np.ndarray:
        return data


@dataclass(frozen=True)
class AsFramedSlice(AsSlice):
    """Item ``i`` is ``length`` frames of ``frame_size`` steps, ``hop_length`` apart.

    The frames of item ``i`` start at step ``i * downsampling + shift * hop_length``
    and the items are every window that fits. With ``center``, the frames'
    centres are there instead (frame ``k`` spans ``[c - frame_size // 2,
    c - frame_size // 2 + frame_size)``), items run while the last centre is in
    the data, and steps before or after the data are padded with ``pad_mode``
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
    """An item bound to its file: the dataset to read and the getter's tables."""

    def __init__(self, item: Input, file: TypedFile | None):
        proxy = _proxy(item, file)
        self.name = f"{type(item).__name__}({proxy.path!r}, {type(item.getter).__name__})"
        if not proxy.exists:
            raise ValueError(f"{self.name}: {proxy.file.filename!r} holds no data for it")
        proxy.file.flush()
        self.filename = proxy.file.filename
        self.h5_kwargs = proxy.file._handle.h5_kwargs
        self.allow_external = proxy.file.allow_external
        proxy.file._check_local(proxy.path)  # here, not in each worker
        self.path = proxy.values_path
        self.getter = item.getter
        self.regions = self._regions(proxy) if isinstance(item.getter, GetId) else None
        self.length = item.getter.n_items(proxy.shape, self.regions)
        self.pre = (slice(None),) * item.getter.dim
        self.extent = proxy.shape[item.getter.dim]
        self.clips = isinstance(item.getter, AsSlice) and item.getter.margins() != (0, 0)
        self.row_bytes = max(1, int(np.prod(_without(proxy.shape, item.getter.dim))))
        self.row_bytes *= proxy.dtype.itemsize
        self.post = tuple(getattr(proxy.feature, "__t__", ()))
        self.transform = item.transform
        self.to_tensor = item.to_tensor

    def _regions(self, proxy: DatasetProxy) -> np.ndarray:
        if not proxy.has_refs:
            raise ValueError(f"{self.name}: {proxy.path!r} is a plain dataset with no ids")
        table = proxy.refs.array
        return np.ascontiguousarray(table[table[:, 0] >= 0])

    def get(self, reader: _Reader, i: int) -> Any:
        ds = reader.dataset(self.filename, self.path, self.h5_kwargs, self.allow_external)
        start, stop = self.getter.span(i, self.regions)
        if not self.clips:
            return self._finish(ds[self.pre + (slice(start, stop),)])
        pad = (max(0, -start), max(0, stop - self.extent))
        return self._finish(ds[self.pre + (slice(start + pad[0], stop - pad[1]),)], pad)

    def get_many(self, reader: _Reader, items: np.ndarray) -> list[Any]:
        ds = reader.dataset(self.filename, self.path, self.h5_kwargs, self.allow_external)
        starts, stops = self.getter.spans(items, self.regions)
        if not self.clips:
            return [self._finish(data) for data in self._read_spans(ds, starts, stops)]
        before, after = np.maximum(0, -starts), np.maximum(0, stops - self.extent)
        blocks = self._read_spans(ds, starts + before, stops - after)
        pads = zip(before.tolist(), after.tolist(), strict=True)
        return [self._finish(data, pad) for data, pad in zip(blocks, pads, strict=True)]

    def _read_spans(self, ds: Any, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        """Read sorted, coalesced blocks; each item is a copy cut from its block."""
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], stops[order]
        reach = np.maximum.accumulate(e)
        new = np.ones(len(s), dtype=bool)
        new[1:] = s[1:] > reach[:-1] + GAP_BYTES // self.row_bytes
        firsts = np.flatnonzero(new)
        block_of = np.cumsum(new) - 1
        bounds = zip(s[firsts].tolist(), np.maximum.reduceat(e, firsts).tolist(), strict=True)
        blocks = [ds[self.pre + (slice(a, b),)] for a, b in bounds]
        shared = np.bincount(block_of) > 1
        base = s[firsts].tolist()
        out: list[Any] = [None] * len(s)
        for k, a, b, j in zip(
            order.tolist(), s.tolist(), e.tolist(), block_of.tolist(), strict=True
        ):
            data = blocks[j]
            if shared[j]:
                data = data[self.pre + (slice(a - base[j], b - base[j]),)].copy()
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


# -- the dataset -------------------------------------------------------------------------------


class ProgrammableDataset:
    """A map-style dataset whose samples have the shape of ``batch``.

    Sample ``i`` is ``batch`` with each :class:`Input` / :class:`Target`
    replaced by its item ``i``; the length is the smallest of the items'
    lengths. It pickles without any open file, so DataLoader workers (fork,
    spawn or forkserver) each open their own read-only handle.

    Parameters
    ----------
    file : TypedFile or None
        The file that ``key=`` paths name (None if every key is a proxy).
    batch : dict, tuple, list or Input
        Any nesting of them, with Input/Target leaves.

    Examples
    --------
    >>> import os, tempfile, numpy as np, h5dask as h5m
    >>> class Logs(h5m.TypedFile):
    ...     loss = h5m.Array()
    >>> logs = Logs(os.path.join(tempfile.mkdtemp(), "logs.h5"), mode="w")
    >>> _ = logs.add("a", {"loss": np.arange(3.0)}).add("b", {"loss": np.arange(2.0)})
    >>> ds = h5m.serve.ProgrammableDataset(logs, {"x": h5m.Input("loss", h5m.GetId())})
    >>> len(ds), ds[1]
    (2, {'x': array([0., 1.])})
    """

    def __init__(self, file: TypedFile | None, batch: Any):
        items: list[Input] = []
        self.file = file
        self.template = _flatten(batch, items)
        if not items:
            raise ValueError("the batch holds no Input or Target item")
        self.leaves = [_Leaf(item, file) for item in items]
        self.length = min(leaf.length for leaf in self.leaves)
        self._reader = _Reader()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Any:
        i = self._check(i)
        return _rebuild(self.template, [leaf.get(self._reader, i) for leaf in self.leaves])

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Many samples at once, reading each item's regions sorted and coalesced."""
        items = np.asarray(indices, dtype=np.int64)
        if len(items) and (items.min() < -self.length or items.max() >= self.length):
            raise IndexError(f"indices out of range for a dataset of {self.length} items")
        items = np.where(items < 0, items + self.length, items)
        columns = [leaf.get_many(self._reader, items) for leaf in self.leaves]
        return [_rebuild(self.template, values) for values in zip(*columns, strict=True)]

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


def serve(file: TypedFile | None, batch: Any, **loader_kwargs: Any) -> Any:
    """A :class:`torch.utils.data.DataLoader` of batches shaped like ``batch``.

    Parameters
    ----------
    file : TypedFile or None
        The file that ``key=`` paths name.
    batch : dict, tuple, list or Input
        Any nesting of them, with :class:`Input` / :class:`Target` leaves.
    **loader_kwargs
        Passed to the DataLoader (``batch_size``, ``shuffle``, ``num_workers``,
        ``multiprocessing_context``...).

    Raises
    ------
    ImportError
        torch is not installed (``pip install h5dask[torch]``).

    Examples
    --------
    >>> loader = exp.serve(dict(x=h5m.Input(key="data/images", getter=h5m.GetId()),
    ...                         y=h5m.Target(key="data/labels", getter=h5m.GetId())),
    ...                    batch_size=32, shuffle=True, num_workers=2)  # doctest: +SKIP
    """
    torch = require_torch()
    return torch.utils.data.DataLoader(ProgrammableDataset(file, batch), **loader_kwargs)
