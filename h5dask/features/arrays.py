"""Generic features: numpy files, raw bytes, text and arrays of varying shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

from ..feature import Feature
from ._common import open_seekable, read_bytes

__all__ = ["Npy", "Bytes", "Text", "VShape", "decode_strings"]

TEXT_PATTERN = r"(?i)\.(txt|md|rst|csv|tsv|json|jsonl|ya?ml|xml|html?)$"


class Npy(Feature):
    """A ``.npy`` array, or the arrays of a ``.npz`` archive, as saved by numpy.

    ``load`` returns the saved array itself (a 0-d array becomes shape
    ``(1,)``, since axis 0 is the concatenation axis); a ``.npz`` gives a dict
    of its arrays, stored as one dataset per name. Pickled (object) arrays are
    refused: opening a data file never runs code.

    Parameters
    ----------
    pattern : str, optional
        Regular expression for ``__re__``; by default ``.npy`` and ``.npz``.
    **ds_kwargs
        Keyword arguments of :meth:`h5py.Group.create_dataset`.

    Examples
    --------
    >>> import numpy as np, h5dask as h5m
    >>> np.save("/tmp/h5dask-doc.npy", np.eye(2))
    >>> h5m.features.Npy().load("/tmp/h5dask-doc.npy")
    array([[1., 0.],
           [0., 1.]])
    """

    __re__ = r"(?i)\.np[yz]$"

    def __init__(self, pattern: str | None = None, **ds_kwargs: Any):
        if pattern is not None:
            self.__re__ = pattern
        self.__ds_kwargs__ = dict(ds_kwargs)

    def load(self, source: str) -> np.ndarray | dict[str, np.ndarray]:
        """Read the array (``.npy``) or the dict of arrays (``.npz``) of ``source``."""
        with open_seekable(source) as f:
            loaded = np.load(f, allow_pickle=False)
            if isinstance(loaded, np.lib.npyio.NpzFile):
                with loaded:
                    return {name: np.atleast_1d(loaded[name]) for name in loaded.files}
        return np.atleast_1d(loaded)


class Bytes(Feature):
    """The raw bytes of a file, as a 1-D ``uint8`` array: one row per byte.

    A source's region of the dataset is thus its whole content;
    :meth:`tobytes` turns what is read back into :class:`bytes`.

    Parameters
    ----------
    pattern : str, optional
        Regular expression for ``__re__``; by default every source.
    **ds_kwargs
        Keyword arguments of :meth:`h5py.Group.create_dataset`, e.g.
        ``compression="gzip"``.

    Examples
    --------
    >>> import h5dask as h5m
    >>> _ = open("/tmp/h5dask-doc.bin", "wb").write(b"abc")
    >>> h5m.features.Bytes().load("/tmp/h5dask-doc.bin")
    array([97, 98, 99], dtype=uint8)
    """

    def __init__(self, pattern: str | None = None, **ds_kwargs: Any):
        if pattern is not None:
            self.__re__ = pattern
        self.__ds_kwargs__ = {"dtype": "uint8", **ds_kwargs}

    def load(self, source: str) -> np.ndarray:
        """Return every byte of ``source``."""
        return np.frombuffer(read_bytes(source), dtype=np.uint8)

    @staticmethod
    def tobytes(data: Any) -> bytes:
        """The :class:`bytes` of an array read from a :class:`Bytes` dataset."""
        return np.asarray(data, dtype=np.uint8).tobytes()


def decode_strings(data: Any) -> Any:
    """Read transform: UTF-8 :class:`bytes` read from HDF5 become :class:`str`.

    Works on one value and on arrays of any shape; other values pass through.
    """
    if isinstance(data, bytes):
        return data.decode("utf-8")
    if isinstance(data, np.ndarray) and data.dtype.kind in "OS":
        out = np.empty(data.shape, dtype=object)
        out.flat[:] = [decode_strings(x) for x in data.flat]
        return out
    return data


class Text(Feature):
    """The text of a file, one item per source: shape ``(1,)``, ``object`` dtype.

    Stored as UTF-8 variable-length strings whatever the source's encoding;
    the read transform gives back :class:`str`.

    Parameters
    ----------
    encoding : str
        Encoding used to decode the source.
    errors : str
        How decoding errors are handled, as in :meth:`bytes.decode`.
    pattern : str, optional
        Regular expression for ``__re__``; by default common text extensions
        (``.txt``, ``.md``, ``.csv``, ``.json``...).
    **ds_kwargs
        Keyword arguments of :meth:`h5py.Group.create_dataset`.

    Examples
    --------
    >>> import h5dask as h5m
    >>> _ = open("/tmp/h5dask-doc.txt", "w").write("hello")
    >>> h5m.features.Text().load("/tmp/h5dask-doc.txt")
    array(['hello'], dtype=object)
    """

    __re__ = TEXT_PATTERN
    __ds_kwargs__ = {"dtype": h5py.string_dtype(encoding="utf-8")}
    __t__ = (decode_strings,)

    def __init__(
        self,
        encoding: str = "utf-8",
        errors: str = "strict",
        pattern: str | None = None,
        **ds_kwargs: Any,
    ):
        "".encode(encoding)  # fail early on an unknown encoding
        self.encoding = encoding
        self.errors = errors
        if pattern is not None:
            self.__re__ = pattern
        self.__ds_kwargs__ = {**type(self).__ds_kwargs__, **ds_kwargs}

    @property
    def attrs(self) -> dict[str, Any]:
        return {"encoding": self.encoding, "errors": self.errors}

    def load(self, source: str) -> np.ndarray:
        """Return ``[text of source]``."""
        text = read_bytes(source).decode(self.encoding, self.errors)
        return np.array([text], dtype=object)


class _Restore:
    """Read transform of :class:`VShape`: reshape, then the base's array transforms."""

    def __init__(self, transforms: tuple[Callable[[Any], Any], ...]):
        self.transforms = transforms

    def __call__(self, data: dict[str, Any]) -> Any:
        shape = tuple(int(n) for n in np.asarray(data["shape_"]).reshape(-1))
        arr = np.asarray(data["arr"]).reshape(shape)
        for transform in self.transforms:
            arr = transform(arr)
        return arr


class VShape(Feature):
    """Arrays of any shape, stored flat with their shapes.

    Wraps a feature whose ``load`` returns arrays that cannot be concatenated
    (images of different sizes, ragged sequences...). ``load`` returns
    ``{"arr": array.reshape(-1), "shape_": np.array(array.shape)}``; reading a
    source's dict back through the group proxy gives the array in its shape,
    with the base feature's ``__t__`` applied.

    Parameters
    ----------
    base_feature : Feature
        The wrapped feature; its ``__re__`` and ``attrs`` are kept, and its
        ``__ds_kwargs__`` (without ``chunks`` and ``maxshape``) apply to
        ``"arr"``.

    Examples
    --------
    >>> import numpy as np, h5dask as h5m
    >>> np.save("/tmp/h5dask-doc.npy", np.ones((2, 3)))
    >>> feature = h5m.features.VShape(h5m.features.Npy())
    >>> stored = feature.load("/tmp/h5dask-doc.npy")
    >>> stored["shape_"]
    array([2, 3])
    >>> feature.__grp_t__[0](stored).shape
    (2, 3)
    """

    def __init__(self, base_feature: Feature):
        if not isinstance(base_feature, Feature):
            raise TypeError(f"VShape wraps a Feature, not a {type(base_feature).__name__}")
        self.base_feature = base_feature
        self.__re__ = base_feature.__re__
        self.derived_from = base_feature.derived_from
        base_kwargs = {
            k: v for k, v in base_feature.__ds_kwargs__.items() if k not in ("chunks", "maxshape")
        }
        self.__ds_kwargs__ = {"arr": base_kwargs, "shape_": {"dtype": "int64"}}
        self.__grp_t__ = (_Restore(tuple(base_feature.__t__)),)

    @property
    def attrs(self) -> dict[str, Any]:
        return self.base_feature.attrs

    def before_create(self, sources: list[str]) -> None:
        self.base_feature.before_create(sources)

    def load(self, source: Any) -> dict[str, np.ndarray] | None:
        """Load with the base feature and flatten its array."""
        arr = self.base_feature.load(source)
        if arr is None:
            return None
        if isinstance(arr, dict):
            raise TypeError("VShape needs its base feature to return an array, not a dict")
        arr = np.asarray(arr)
        return {"arr": arr.reshape(-1), "shape_": np.array(arr.shape, dtype=np.int64)}
