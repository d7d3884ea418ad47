"""The id index: id -> position on the ids axis, without a Python dict per id."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cached_property

import numpy as np
from numpy.dtypes import StringDType

__all__ = ["IdIndex"]


def utf8_keys(ids: object) -> np.ndarray:
    """Ids as a fixed-width bytes array of their UTF-8 encodings."""
    array = np.asarray(ids)
    if array.dtype.kind == "S":
        return array
    if array.dtype.kind == "O" and all(isinstance(x, bytes) for x in array.flat):
        return array.astype("S") if array.size else np.array([], dtype="S1")
    return np.strings.encode(array.astype(StringDType()), "utf-8")


class IdIndex(Mapping[str, int]):
    """Read-only mapping of id to position, backed by sorted numpy arrays.

    Lookups are binary searches over the UTF-8 bytes of the ids (about a
    microsecond, even over millions of ids), and the index holds no Python
    object per id, so processes forked from the one that built it (DataLoader
    workers) share its memory.

    Examples
    --------
    >>> index = IdIndex(["b", "a/é"])
    >>> index["a/é"], "c" in index, list(index)
    (1, False, ['b', 'a/é'])
    """

    def __init__(self, ids: object):
        self._keys = utf8_keys(ids)
        self._order = np.argsort(self._keys, kind="stable")
        self._sorted = self._keys[self._order]

    @cached_property
    def ids(self) -> np.ndarray:
        """The ids in position order, as a numpy ``StringDType`` array."""
        return self._keys.astype(StringDType())

    def __getitem__(self, id: str) -> int:
        position = self._find(id)
        if position < 0:
            raise KeyError(id)
        return position

    def _find(self, id: object) -> int:
        if not isinstance(id, str) or not len(self._sorted):
            return -1
        key = id.encode("utf-8")
        i = int(np.searchsorted(self._sorted, key))
        if i < len(self._sorted) and self._sorted[i] == key:
            return int(self._order[i])
        return -1

    def __contains__(self, id: object) -> bool:
        return self._find(id) >= 0

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids.tolist())

    def positions(self, ids: object) -> np.ndarray:
        """Positions of many ids at once; ``-1`` where an id is absent."""
        keys = utf8_keys(ids)
        if not len(self._sorted) or not len(keys):
            return np.full(len(keys), -1, dtype=np.int64)
        i = np.searchsorted(self._sorted, keys).clip(0, len(self._sorted) - 1)
        found = self._sorted[i] == keys
        return np.where(found, self._order[i], -1).astype(np.int64)

    def __repr__(self) -> str:
        return f"<IdIndex of {len(self)} ids>"
