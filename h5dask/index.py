"""The id index: id -> position on the ids axis, without a Python dict per id."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
from numpy.dtypes import StringDType

__all__ = ["IdIndex"]


class IdIndex(Mapping[str, int]):
    """Read-only mapping of id to position, backed by sorted numpy arrays.

    Lookups are binary searches (a few microseconds, even over millions of ids),
    and the index holds no Python object per id, so processes forked from the
    one that built it (DataLoader workers) share its memory.

    Examples
    --------
    >>> index = IdIndex(np.array(["b", "a"], dtype=StringDType()))
    >>> index["a"], "c" in index, list(index)
    (1, False, ['b', 'a'])
    """

    def __init__(self, ids: np.ndarray):
        self.ids = np.asarray(ids, dtype=StringDType())
        self._order = np.argsort(self.ids, kind="stable")
        self._sorted = self.ids[self._order]

    def __getitem__(self, id: str) -> int:
        position = self._find(id)
        if position < 0:
            raise KeyError(id)
        return position

    def _find(self, id: object) -> int:
        if not isinstance(id, str):
            return -1
        i = int(np.searchsorted(self._sorted, id))
        if i < len(self._sorted) and self._sorted[i] == id:
            return int(self._order[i])
        return -1

    def __contains__(self, id: object) -> bool:
        return self._find(id) >= 0

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids.tolist())

    def positions(self, ids: np.ndarray | list[str]) -> np.ndarray:
        """Positions of many ids at once; ``-1`` where an id is absent."""
        ids = np.asarray(ids, dtype=StringDType())
        i = np.searchsorted(self._sorted, ids).clip(0, max(len(self._sorted) - 1, 0))
        if not len(self._sorted):
            return np.full(len(ids), -1, dtype=np.int64)
        found = self._sorted[i] == ids
        return np.where(found, self._order[i], -1).astype(np.int64)

    def __repr__(self) -> str:
        return f"<IdIndex of {len(self)} ids>"
