"""The single writer: buffered, batched appends in id order, then one commit.

Every write to a typed file, from :meth:`TypedFile.create` and from ``add`` or
``set``, goes through a :class:`Writer`. It checks each result against its
dataset as it arrives (so a bad result fails alone, naming its source and
feature), buffers results, and flushes them in batches: values first, then
ref rows, then the ids, then an HDF5 flush. Appending the ids is the commit
point: refs and values past the committed ids are cut the next time the file
is written, so a crash never leaves refs pointing to unwritten data.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from . import format as fmt
from .errors import ConcatError
from .extract import flatten

if TYPE_CHECKING:
    from .typed_file import TypedFile

__all__ = ["Writer", "Spec"]

FLUSH_BYTES = 16 << 20
FLUSH_SECONDS = 1.0


@dataclass
class Spec:
    """What a feature's dataset accepts: its dtype and trailing shape."""

    dtype: np.dtype
    trailing: tuple[int, ...]
    explicit: bool = False

    @cached_property
    def is_string(self) -> bool:
        return fmt.is_string_dtype(self.dtype)

    def check(self, array: np.ndarray, source: str, feature: str) -> np.ndarray:
        """Return ``array`` cast to this spec, or raise :class:`ConcatError`."""
        if array.shape[1:] != self.trailing:
            raise ConcatError(
                source,
                feature,
                f"shape {array.shape} cannot be concatenated to the dataset's rows of shape "
                f"{self.trailing}",
            )
        if self.is_string:
            if array.dtype.kind not in "UOTS":
                raise ConcatError(source, feature, f"{array.dtype} values in a string dataset")
            return array
        if array.dtype.kind in "UOTS":
            raise ConcatError(source, feature, f"strings in a dataset of dtype {self.dtype}")
        if array.dtype == self.dtype:
            return array
        casting = "same_kind" if self.explicit else "safe"
        if not np.can_cast(array.dtype, self.dtype, casting):
            raise ConcatError(
                source,
                feature,
                f"dtype {array.dtype} cannot be cast ({casting}) to the dataset's {self.dtype}; "
                "set the dtype in the feature's __ds_kwargs__ or cast in load()",
            )
        return array.astype(self.dtype)


class Writer:
    """Buffers results by id and appends them to a typed file in batches.

    Parameters
    ----------
    file : TypedFile
        The file written to; it must be open for writing.
    flush_bytes : int
        Flush once this many bytes are buffered.
    flush_seconds : float or None
        Flush on an ``append`` when the oldest buffered result is this old,
        so that results added interactively reach the disk soon.
    """

    def __init__(
        self,
        file: TypedFile,
        flush_bytes: int = FLUSH_BYTES,
        flush_seconds: float | None = FLUSH_SECONDS,
    ):
        self.file = file
        self.flush_bytes = flush_bytes
        self.flush_seconds = flush_seconds
        self._pending: dict[str, dict[str, np.ndarray]] = {}
        self._specs: dict[str, Spec] = {}
        self._bytes = 0
        self._since = 0.0
        self._trimmed = False
        self.pid = os.getpid()

    @property
    def pending(self) -> int:
        """Number of ids buffered and not yet committed."""
        return len(self._pending)

    def append(self, id: str, result: Mapping[str, Any]) -> None:
        """Buffer a normalised result (a nested dict of arrays) for ``id``.

        Raises
        ------
        ConcatError
            An array does not fit its dataset; nothing of ``result`` is buffered.
        """
        checked = {path: self._check(id, path, a) for path, a in flatten(result).items()}
        if not checked:
            return
        if not self._pending:
            self._since = time.monotonic()
        self._pending.setdefault(id, {}).update(checked)
        self._bytes += sum(a.nbytes for a in checked.values())
        if self._bytes >= self.flush_bytes or (
            self.flush_seconds is not None and time.monotonic() - self._since >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Write and commit every buffered result."""
        if not self._pending:
            return
        pending, self._pending, self._bytes = self._pending, {}, 0
        try:
            with self.file._handle.open(write=True) as f:
                self._write(f, pending)
        finally:
            self._specs.clear()
            self.file._invalidate()

    def _check(self, id: str, path: str, array: np.ndarray) -> np.ndarray:
        spec = self._specs.get(path) or self._spec_in_file(id, path)
        if spec is None:
            spec = self._new_spec(path, array)
        self._specs[path] = spec
        return spec.check(array, id, path)

    def _spec_in_file(self, id: str, path: str) -> Spec | None:
        layout = self.file._committed_layout()
        node = layout.get(path)
        if node is not None and node.kind == "feature":
            return Spec(
                node.dtype, node.shape[1:], self.file._ds_kwargs(path).get("dtype") is not None
            )
        if node is not None and node.kind == "dataset":
            raise ConcatError(id, path, "the file holds a plain dataset there, not a feature")
        for parent in _parents(path):
            if parent in layout and layout[parent].kind != "group":
                raise ConcatError(id, path, f"{parent!r} is an array feature, not a group")
        if node is not None and any(p.startswith(path + "/") for p in layout):
            raise ConcatError(id, path, "the file holds a group of features there, not an array")
        return None

    def _new_spec(self, path: str, array: np.ndarray) -> Spec:
        dtype = self.file._ds_kwargs(path).get("dtype")
        if dtype is None:
            return Spec(fmt.storage_dtype(array), array.shape[1:])
        return Spec(np.dtype(dtype), array.shape[1:], explicit=True)

    def _write(self, f: h5py.File, pending: dict[str, dict[str, np.ndarray]]) -> None:
        if fmt.IDS not in f:
            fmt.init_root(f)
        if not self._trimmed:
            fmt.trim_uncommitted(f, self.file._feature_paths())
            self._trimmed = True
        n = fmt.n_ids(f)
        index = self.file._committed_index()
        new_ids = [id for id in pending if id not in index]
        new_pos = {id: n + k for k, id in enumerate(new_ids)}
        total = n + len(new_ids)
        by_feature: dict[str, list[tuple[int, np.ndarray]]] = {}
        for id, flat in pending.items():
            pos = new_pos[id] if id in new_pos else index[id]
            for path, array in flat.items():
                by_feature.setdefault(path, []).append((pos, array))
        for path, items in by_feature.items():
            self._write_feature(f, path, items, total)
        for path in self.file._feature_paths():
            refs = f[path][fmt.REFS]
            if refs.shape[0] < total:
                refs.resize(total, axis=0)
        fmt.append_ids(f, new_ids)
        f.flush()

    def _write_feature(
        self, f: h5py.File, path: str, items: list[tuple[int, np.ndarray]], total: int
    ) -> None:
        arrays = [a for _, a in items]
        values = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        if path not in f or fmt.VALUES not in f[path]:
            self.file._init_feature_group(f, path)
            fmt.create_feature(f, path, values, self.file._ds_kwargs(path), total)
        group = f[path]
        if fmt.is_string_dtype(group[fmt.VALUES].dtype):
            values = np.array([_to_str(v) for v in values.flat], dtype=object).reshape(values.shape)
        start, _ = fmt.append_rows(group[fmt.VALUES], values)
        stops = start + np.cumsum([a.shape[0] for a in arrays])
        rows = np.stack([stops - [a.shape[0] for a in arrays], stops], axis=1)
        if group[fmt.REFS].shape[0] < total:
            group[fmt.REFS].resize(total, axis=0)
        fmt.write_ref_rows(group[fmt.REFS], np.array([p for p, _ in items]), rows)


def _to_str(value: Any) -> Any:
    return value if isinstance(value, (str, bytes)) else str(value)


def _parents(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]
