"""Features: the declared columns of a typed file.

A :class:`Feature` says how to turn one source into arrays (:meth:`Feature.load`),
which sources it accepts (``__re__``), how its HDF5 dataset is created
(``__ds_kwargs__``) and which parameters it records (:attr:`Feature.attrs`).
Features are declared as class attributes of a :class:`~h5dask.TypedFile`;
reading such an attribute on an opened file gives the feature's proxy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import h5py

from .errors import SchemaError

__all__ = ["Feature", "Array", "Group", "String", "iter_leaves", "name_problem"]


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name a feature (it is an HDF5 link of one part), or None.

    Examples
    --------
    >>> name_problem("images"), name_problem("a/b"), name_problem("..")
    (None, "holds '/'", 'is a relative path')
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a str"
    if not name:
        return "is empty"
    if "/" in name:
        return "holds '/'"
    if name in (".", ".."):
        return "is a relative path"
    return None


class Feature:
    """Base class of every feature.

    Subclass it and override :meth:`load`; any other method you add is
    reachable from the feature's proxy on an opened file.

    Attributes
    ----------
    __re__ : str
        Regular expression applied with :func:`re.search` to each source;
        only matching sources reach :meth:`load`.
    __ds_kwargs__ : dict
        Keyword arguments of :meth:`h5py.Group.create_dataset` (``dtype``,
        ``compression``, ``chunks``...). When :meth:`load` returns a dict, a
        key of it may map to the keyword arguments of that entry.
    __t__ : tuple of callables
        Applied in turn to every array read through the proxy.
    __grp_t__ : tuple of callables
        Applied in turn to every dict read through a group proxy.
    derived_from : str or None
        Name of a sibling feature: :meth:`load` then receives that feature's
        result instead of the source.

    Examples
    --------
    >>> import numpy as np
    >>> import h5dask as h5m
    >>> class Squares(h5m.Feature):
    ...     __re__ = r"^\\d+$"
    ...     def load(self, source):
    ...         return np.arange(int(source)) ** 2
    >>> Squares().load("4")
    array([0, 1, 4, 9])
    """

    __re__: str = r".*"
    __ds_kwargs__: dict[str, Any] = {}
    __t__: tuple = ()
    __grp_t__: tuple = ()
    derived_from: str | None = None
    name: str | None = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None or not hasattr(obj, "get_proxy"):
            return self
        return obj.get_proxy(self.name)

    @property
    def attrs(self) -> dict[str, Any]:
        """Parameters stored as HDF5 attributes on the feature's group."""
        return {}

    @property
    def loads(self) -> bool:
        """Whether this feature extracts data from sources (``load`` is overridden)."""
        return type(self).load is not Feature.load

    def load(self, source: Any) -> Any:
        """Turn one source into an array, a dict of arrays, a string, a scalar or None.

        Parameters
        ----------
        source : str or object
            The source string (a path, a URL or any id), or the result of the
            feature named by :attr:`derived_from`.
        """
        raise NotImplementedError(f"{type(self).__qualname__} does not implement load()")

    def before_create(self, sources: list[str]) -> None:
        """Run once in the calling process with every source id, before any ``load``.

        Override it to learn something from the whole source list, such as a
        vocabulary of labels; the feature is then sent to the workers as it is.
        """

    def after_create(self, file: Any, feature_key: str) -> None:
        """Run once after :meth:`TypedFile.create` wrote every source.

        Parameters
        ----------
        file : TypedFile
            The new file, open for writing.
        feature_key : str
            This feature's path in the file, for ``file.get_proxy(feature_key)``.
        """

    def restored(self, attrs: Mapping[str, Any]) -> Feature:
        """This feature as it was when it wrote a file whose stored ``attrs`` are given.

        A proxy's feature methods run on what this returns, so that state
        computed at create time and kept in the attrs (``DirLabels``'
        vocabulary) is the file's own, in any process. The default is the
        feature itself.
        """
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self.name!r}>"


class Array(Feature):
    """A feature filled only by ``add`` and ``set`` (logs, checkpoints, results).

    Parameters
    ----------
    pattern : str, optional
        Regular expression for ``__re__``.
    **ds_kwargs
        Keyword arguments of :meth:`h5py.Group.create_dataset`.

    Examples
    --------
    >>> import h5dask as h5m
    >>> class Logs(h5m.TypedFile):
    ...     loss = h5m.Array(compression="gzip")
    """

    def __init__(self, pattern: str | None = None, **ds_kwargs: Any):
        if pattern is not None:
            self.__re__ = pattern
        self.__ds_kwargs__ = {**type(self).__ds_kwargs__, **ds_kwargs}


class String(Array):
    """An :class:`Array` of UTF-8 strings."""

    __ds_kwargs__ = {"dtype": h5py.string_dtype(encoding="utf-8")}


class Group(Feature):
    """A named collection of features, stored as one HDF5 group.

    Parameters
    ----------
    **features : Feature
        The members, by name. Groups nest.

    Examples
    --------
    >>> import h5dask as h5m
    >>> class Experiment(h5m.TypedFile):
    ...     logs = h5m.Group(loss=h5m.Array(), acc=h5m.Array())
    >>> sorted(Experiment.logs.features)
    ['acc', 'loss']
    """

    def __init__(self, **features: Feature):
        for name, feature in features.items():
            if not isinstance(feature, Feature):
                kind = type(feature).__name__
                raise TypeError(f"Group member {name!r} is a {kind}, not a Feature")
            problem = name_problem(name)
            if problem:
                raise SchemaError(f"Group member {name!r} cannot name a feature: it {problem}")
            feature.name = name
        self.features: dict[str, Feature] = dict(features)

    @property
    def loads(self) -> bool:
        return any(feature.loads for feature in self.features.values())

    def load(self, source: Any) -> dict[str, Any]:
        """Run every member's ``load`` on ``source``, as :meth:`TypedFile.create` does."""
        from .extract import load_schema

        return load_schema(source, self.features)

    def before_create(self, sources: list[str]) -> None:
        for feature in self.features.values():
            feature.before_create(sources)

    def after_create(self, file: Any, feature_key: str) -> None:
        for name, feature in self.features.items():
            feature.after_create(file, f"{feature_key}/{name}")

    def __getattr__(self, name: str) -> Feature:
        features = self.__dict__.get("features", {})
        if name in features:
            return features[name]
        raise AttributeError(f"Group has no member {name!r}")

    def __repr__(self) -> str:
        return f"<Group {self.name!r}: {', '.join(self.features)}>"


def iter_leaves(schema: Mapping[str, Feature], prefix: str = "") -> Iterator[tuple[str, Feature]]:
    """Yield ``(path, feature)`` for every non-group feature of a schema."""
    for name, feature in schema.items():
        path = f"{prefix}{name}"
        if isinstance(feature, Group):
            yield from iter_leaves(feature.features, path + "/")
        else:
            yield path, feature
