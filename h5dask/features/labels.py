"""Integer class labels taken from the name of each source's parent directory."""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..feature import Feature

__all__ = ["DirLabels", "parent_name"]

LABELED_PATTERN = r"(?i)\.(png|jpe?g|bmp|gif|tiff?|webp|wav|flac|ogg|oga|aiff?|au|mp3)$"


def parent_name(source: str) -> str:
    """The name of the directory holding ``source``, or ``""`` if it has none.

    Works on local paths (``/`` or ``\\`` separators) and URLs, whose query
    string and fragment are ignored.

    Examples
    --------
    >>> parent_name("s3://bucket/cats/01.png?version=3")
    'cats'
    >>> parent_name("data/./dogs/02.jpg")
    'dogs'
    >>> parent_name("03.png")
    ''
    """
    path = str(source)
    if "://" in path:
        path = re.split(r"[?#]", path.split("://", 1)[1], maxsplit=1)[0]
    path = posixpath.normpath(path.replace("\\", "/"))
    parent = posixpath.basename(posixpath.dirname(path))
    return "" if parent in (".", "..") else parent


def _as_str(name: Any) -> str:
    return name.decode("utf-8") if isinstance(name, bytes) else str(name)


class DirLabels(Feature):
    """The index of each source's parent directory in a sorted vocabulary.

    ``load`` returns an ``int64`` array of shape ``(1,)``: one label per source.
    The vocabulary is the sorted list of the parent directories' names of every
    source that ``__re__`` matches; :meth:`before_create` computes it from the
    whole source list before any ``load``, and it is stored in the file as
    ``attrs["vocabulary"]``. :meth:`decode` maps labels back to names.

    Parameters
    ----------
    pattern : str, optional
        Regular expression for ``__re__``; by default common image and sound
        extensions.
    vocabulary : list of str, optional
        A fixed vocabulary, kept as given (not sorted), e.g. to share labels
        between a train and a test file. :meth:`before_create` then leaves it
        as it is, and a source whose directory is not in it fails to load.
    **ds_kwargs
        Keyword arguments of :meth:`h5py.Group.create_dataset`.

    Examples
    --------
    >>> import h5dask as h5m
    >>> labels = h5m.features.DirLabels()
    >>> labels.before_create(["pets/dog/1.png", "pets/cat/2.png", "pets/notes.txt"])
    >>> labels.vocabulary
    ['cat', 'dog']
    >>> labels.load("pets/dog/1.png")
    array([1])
    >>> labels.decode([0, 1, 1])
    ['cat', 'dog', 'dog']
    """

    __re__ = LABELED_PATTERN

    def __init__(
        self,
        pattern: str | None = None,
        vocabulary: Iterable[str] | None = None,
        **ds_kwargs: Any,
    ):
        if pattern is not None:
            self.__re__ = pattern
        self.fixed_vocabulary = None if vocabulary is None else [str(v) for v in vocabulary]
        self.vocabulary: list[str] | None = self.fixed_vocabulary
        self.__ds_kwargs__ = {"dtype": "int64", **ds_kwargs}

    @property
    def attrs(self) -> dict[str, Any]:
        return {"vocabulary": list(self.vocabulary or [])}

    def before_create(self, sources: list[str]) -> None:
        """Set :attr:`vocabulary` to the sorted parent names of the matching sources."""
        if self.fixed_vocabulary is not None:
            self.vocabulary = list(self.fixed_vocabulary)
            return
        names = {parent_name(s) for s in sources if re.search(self.__re__, str(s))}
        self.vocabulary = sorted(names)

    def restored(self, attrs: Mapping[str, Any]) -> DirLabels:
        """A copy holding the file's stored vocabulary, which its labels index."""
        if "vocabulary" not in attrs:
            return self
        restored = copy.copy(self)
        restored.vocabulary = [_as_str(name) for name in attrs["vocabulary"]]
        return restored

    def load(self, source: str) -> np.ndarray:
        """Return ``[index of the parent directory's name in the vocabulary]``."""
        vocabulary = self._require_vocabulary()
        name = parent_name(source)
        try:
            index = vocabulary.index(name)
        except ValueError:
            raise ValueError(
                f"directory {name!r} of {source!r} is not in the vocabulary {vocabulary}"
            ) from None
        return np.array([index], dtype=np.int64)

    def decode(self, labels: Any, vocabulary: list[str] | None = None) -> Any:
        """Map integer labels back to directory names.

        Parameters
        ----------
        labels : int or array_like of int
            Labels as read from the file, of any shape.
        vocabulary : list of str, optional
            Defaults to :attr:`vocabulary`; through a file's proxy
            (``file.label.decode(...)``), the vocabulary stored in that file.

        Returns
        -------
        str or list
            A name for a scalar label, otherwise nested lists of names shaped
            like ``labels``.
        """
        given = vocabulary if vocabulary is not None else self._require_vocabulary()
        names = np.array([_as_str(n) for n in given], dtype=object)
        return np.asarray(names[np.asarray(labels, dtype=np.int64)], dtype=object).tolist()

    def _require_vocabulary(self) -> list[str]:
        if self.vocabulary is None:
            raise RuntimeError(
                "DirLabels has no vocabulary yet: call before_create(sources) "
                "(TypedFile.create does) or pass vocabulary=[...], e.g. the stored "
                "proxy.attrs['vocabulary'] of an existing file"
            )
        return self.vocabulary
