"""Running features on sources: ``load`` calls, ``__re__`` matching, result checks.

This is the code that runs in workers. It returns plain nested dicts of numpy
arrays and never touches the HDF5 file.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

import numpy as np

from . import format as fmt
from .errors import LoadError, ResultTypeError, SourceFeatureError, describe

__all__ = ["load_schema", "may_load", "normalize", "flatten", "unflatten", "feature_running"]

Result = dict[str, Any]


def load_schema(source: Any, schema: Mapping[str, Any], prefix: str = "") -> Result:
    """Run every feature of ``schema`` on ``source``; return its non-empty results.

    Features run in the schema's order, so a feature can be ``derived_from`` an
    earlier one. A feature whose ``__re__`` does not match, or whose ``load``
    returns None, is absent from the result.

    Raises
    ------
    LoadError
        A ``load`` raised; the original exception is the ``__cause__``.
    ResultTypeError
        A ``load`` returned a type h5dask cannot store.
    """
    out: Result = {}
    for name, feature in schema.items():
        if not feature.loads:
            continue
        path = prefix + name
        if feature.derived_from is not None:
            if feature.derived_from not in out:
                continue
            arg = out[feature.derived_from]
        elif isinstance(source, str) and not _matches(feature.__re__, source):
            continue
        else:
            arg = source
        members = getattr(feature, "features", None)
        if isinstance(members, Mapping):
            value = load_schema(arg, members, path + "/") or None
        else:
            value = normalize(_call_load(feature, arg, source, path), source, path)
        if value is not None:
            out[name] = value
    return out


def may_load(source: Any, schema: Mapping[str, Any]) -> bool:
    """Whether some feature of ``schema`` would call ``load`` on ``source`` (by its ``__re__``).

    Examples
    --------
    >>> import h5dask as h5m
    >>> class Png(h5m.Feature):
    ...     __re__ = r"\\.png$"
    ...     def load(self, source): ...
    >>> may_load("a.png", {"img": Png()}), may_load("a.wav", {"img": Png()})
    (True, False)
    """
    for feature in schema.values():
        if not feature.loads or feature.derived_from is not None:
            continue  # a derived feature loads only what another one loaded
        if isinstance(source, str) and not _matches(feature.__re__, source):
            continue
        members = getattr(feature, "features", None)
        if not isinstance(members, Mapping) or may_load(source, members):
            return True
    return False


@functools.lru_cache(maxsize=256)
def _search(pattern: str) -> Callable[[str], Any] | None:
    """The ``search`` of a compiled ``pattern``; None for ``.*``, which every source matches."""
    return None if pattern == ".*" else re.compile(pattern).search


def _matches(pattern: str, source: str) -> bool:
    search = _search(pattern)
    return search is None or search(source) is not None


def _call_load(feature: Any, arg: Any, source: Any, path: str) -> Any:
    try:
        return feature.load(arg)
    except SourceFeatureError:
        raise
    except Exception as exc:
        raise LoadError(str(source), path, f"load() raised {describe(exc)}") from exc


def feature_running(frame: FrameType | None) -> str | None:
    """The path of the feature whose ``load`` runs in ``frame`` or a frame that called it."""
    while frame is not None:
        if frame.f_code is _call_load.__code__:
            return frame.f_locals["path"]
        frame = frame.f_back
    return None


def normalize(value: Any, source: Any = "", path: str = "") -> Any:
    """Turn a ``load`` result into a numpy array with an axis 0, a dict of them, or None.

    Strings and scalars become 1-element arrays; 0-d arrays gain an axis;
    dicts are normalised recursively and lose their None entries.

    Examples
    --------
    >>> normalize(3.5)
    array([3.5])
    >>> normalize({"a": "text", "b": None})
    {'a': array(['text'], dtype='<U4')}
    """
    if type(value) is np.ndarray:  # the usual result, before slower checks
        return _normalize_array(value, source, path)
    if value is None:
        return None
    if isinstance(value, Mapping):
        return _normalize_dict(value, source, path)
    if isinstance(value, (str, bytes)) and (problem := fmt.text_problem(value)):
        kind = "str" if isinstance(value, str) else "bytes"
        raise ResultTypeError(str(source), path, f"load() returned a {kind} value that {problem}")
    if isinstance(value, (str, bytes, bool, int, float, complex, np.generic)):
        return np.array([value])
    if isinstance(value, np.ndarray):
        return _normalize_array(value, source, path)
    hint = _hint(value)
    raise ResultTypeError(
        str(source),
        path,
        f"load() returned a {type(value).__qualname__}, which cannot be stored{hint}",
    )


def _normalize_dict(value: Mapping, source: Any, path: str) -> Result | None:
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or "/" in key or key in (".", ".."):
            raise ResultTypeError(
                str(source), path, f"load() returned a dict with key {key!r}; keys must be names"
            )
        item = normalize(item, source, f"{path}/{key}" if path else key)
        if item is not None:
            out[key] = item
    return out or None


def _normalize_array(array: np.ndarray, source: Any, path: str) -> np.ndarray:
    if array.dtype.kind == "O" and not all(isinstance(x, str) for x in array.flat):
        raise ResultTypeError(
            str(source), path, "load() returned an object array; only arrays of str can be stored"
        )
    if array.dtype.kind == "V" and array.dtype.fields is None:
        raise ResultTypeError(str(source), path, f"load() returned an array of dtype {array.dtype}")
    problem = fmt.rows_problem(array)
    if problem:
        raise ResultTypeError(str(source), path, problem)
    return array.reshape(1) if array.ndim == 0 else array


def _hint(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "; return np.asarray(...) instead"
    if hasattr(value, "numpy") and hasattr(value, "detach"):
        return "; return tensor.detach().cpu().numpy() instead"
    if hasattr(value, "to_numpy"):
        return "; return .to_numpy() instead"
    return "; return a numpy array, a dict of them, a str, a scalar or None"


def flatten(result: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten a nested result into ``{"group/feature": array}``.

    Examples
    --------
    >>> flatten({"a": {"b": np.zeros(1)}})
    {'a/b': array([0.])}
    """
    flat: dict[str, np.ndarray] = {}
    for key, value in result.items():
        if type(value) is not np.ndarray and isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nest ``{"group/feature": value}`` into dicts by the parts of each path: the inverse
    of :func:`flatten`.

    Examples
    --------
    >>> unflatten({"a/b": 1, "a/c": 2, "d": 3})
    {'a': {'b': 1, 'c': 2}, 'd': 3}
    """
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, name = path.split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    return nested
