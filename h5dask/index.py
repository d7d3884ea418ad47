"""The id index: id -> position on the ids axis, without a Python dict per id."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property

import numpy as np
from numpy.dtypes import StringDType

__all__ = ["IdIndex"]

BLOCK = 1 << 16


def utf8_keys(ids: object) -> np.ndarray:
    """Ids as a fixed-width bytes array of their UTF-8 encodings.

    Examples
    --------
    >>> utf8_keys(["a", "é", b"b", 3]).tolist()
    [b'a', b'\\xc3\\xa9', b'b', b'3']
    """
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "S":
        return ids
    items = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)  # type: ignore[call-overload]
    if not items:
        return np.array([], dtype="S1")
    try:  # numpy encodes ASCII ids (the usual ones) fastest
        return np.array(items, "S")
    except UnicodeEncodeError:
        pass
    try:  # one encode of them all is twice as fast as one per id (and np.strings.encode)
        parts = "\0".join(items).encode("utf-8").split(b"\0")
    except TypeError:  # bytes mixed with str, or not strings at all
        parts = [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in items]
    if len(parts) != len(items):  # an id holds a NUL
        parts = [x.encode("utf-8") for x in items]
    return np.array(parts, "S")


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
        self._order = np.argsort(self._keys, kind="stable")  # stable: much faster on bytes
        self._sorted = self._keys[self._order]

    @property
    def distinct(self) -> bool:
        """Whether no id comes twice."""
        return not (self._sorted[1:] == self._sorted[:-1]).any()

    def extended(self, ids: Sequence[str] | np.ndarray | IdIndex) -> IdIndex:
        """A new index of these ids followed by ``ids`` (absent from it, each once).

        Merging the sorted keys costs one pass over the index, where
        rebuilding it would sort every id again; an index of the new ids
        brings them sorted already.

        Examples
        --------
        >>> index = IdIndex(["b", "d"]).extended(["c", "a"])
        >>> index["a"], index["c"], list(index)
        (3, 2, ['b', 'd', 'c', 'a'])
        """
        new = ids if isinstance(ids, IdIndex) else IdIndex(ids)
        if not len(new):
            return self
        dtype = np.promote_types(self._keys.dtype, new._keys.dtype)
        at = np.searchsorted(self._sorted, new._sorted)
        index = IdIndex.__new__(IdIndex)
        index._keys = np.concatenate([self._keys, new._keys]).astype(dtype, copy=False)
        index._sorted = np.insert(self._sorted.astype(dtype), at, new._sorted)
        index._order = np.insert(self._order, at, new._order + len(self._keys))
        return index

    @property
    def utf8(self) -> np.ndarray:
        """The ids' UTF-8 encodings in position order, as a fixed-width bytes array."""
        return self._keys

    @cached_property
    def ids(self) -> np.ndarray:
        """The ids in position order, as a numpy ``StringDType`` array."""
        return self._keys.astype(StringDType())

    def __getitem__(self, id: str) -> int:
        position = self.position(id)
        if position < 0:
            raise KeyError(id)
        return position

    def position(self, id: object) -> int:
        """The position of ``id``, or ``-1`` if it is absent."""
        if not isinstance(id, str) or not len(self._sorted):
            return -1
        key = id.encode("utf-8")
        i = int(np.searchsorted(self._sorted, key))
        if i < len(self._sorted) and self._sorted[i] == key:
            return int(self._order[i])
        return -1

    def __contains__(self, id: object) -> bool:
        return self.position(id) >= 0

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids.tolist())

    def positions(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """Positions of many ids at once; ``-1`` where an id is absent.

        Ids are looked up by blocks of :data:`BLOCK`, so that the memory this
        takes does not grow with the number of ids asked for.
        """
        out = np.full(len(ids), -1, dtype=np.int64)
        if not len(self._sorted):
            return out
        for start in range(0, len(ids), BLOCK):
            keys = utf8_keys(ids[start : start + BLOCK])
            i = np.searchsorted(self._sorted, keys).clip(0, len(self._sorted) - 1)
            found = self._sorted[i] == keys
            out[start : start + len(keys)] = np.where(found, self._order[i], -1)
        return out

    def __repr__(self) -> str:
        return f"<IdIndex of {len(self)} ids>"
