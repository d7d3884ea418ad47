"""PyTorch state dicts (model and optimizer checkpoints).

torch is imported only when a :class:`TensorDict` is used, never at import.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Number
from typing import Any

import numpy as np

from ..feature import Feature
from ._common import open_seekable, require

__all__ = ["TensorDict", "to_tensors"]


def _torch() -> Any:
    return require("torch", "torch", "torch", "h5dask.features.TensorDict")


def _to_numpy(value: Any, torch: Any) -> Any:
    """One leaf of a state dict as an array of at least 1 dimension, or None to drop it."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return np.atleast_1d(tensor.numpy())
    if isinstance(value, np.ndarray):
        return np.atleast_1d(value)
    if isinstance(value, (Number, np.generic)):
        return np.atleast_1d(np.asarray(value))
    if isinstance(value, str):
        return np.array([value], dtype=object)
    return None


def _format(state: Mapping[str, Any], torch: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, (list, tuple)):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, Mapping):
            value = _format(value, torch)
            if value:
                out[str(key)] = value
            continue
        arr = _to_numpy(value, torch)
        if arr is not None:
            out[str(key)] = arr
    return out


def to_tensors(data: Any) -> Any:
    """Read transform: numeric arrays of a (nested) dict become CPU torch tensors.

    Strings and other values are left as they are.
    """
    torch = _torch()
    if isinstance(data, Mapping):
        return {key: to_tensors(value) for key, value in data.items()}
    if isinstance(data, np.ndarray) and data.dtype.kind in "biufc":
        return torch.from_numpy(np.ascontiguousarray(data))
    return data


class TensorDict(Feature):
    """A PyTorch state dict (``model.state_dict()``, a checkpoint), stored as a group.

    ``load`` reads a checkpoint with ``torch.load(f, map_location="cpu",
    weights_only=True)`` and returns the (nested) dict of its tensors as numpy
    arrays (``np.atleast_1d`` of each, so scalars become shape ``(1,)``;
    ``bfloat16`` becomes ``float32``). Lists and tuples, such as an
    optimizer's ``param_groups``, become dicts keyed ``"0"``, ``"1"``...;
    numbers become arrays, strings are kept and ``None`` is dropped.
    Reading a dict back through the group proxy gives torch tensors.

    Parameters
    ----------
    state_dict : dict, optional
        A template state dict: each top-level tensor gets an ``lzf``-compressed
        dataset chunked by its shape, so that one checkpoint is one chunk.
    pattern : str, optional
        Regular expression for ``__re__``; by default ``.pt``, ``.pth`` and
        ``.ckpt`` files.

    Notes
    -----
    Needs torch (``pip install h5dask[torch]``); ``load``, :meth:`format` and
    the read transform raise an ``ImportError`` saying so when it is missing.

    Examples
    --------
    >>> import torch, h5dask as h5m
    >>> model = torch.nn.Linear(3, 2)
    >>> arrays = h5m.features.TensorDict.format(model.state_dict())
    >>> {k: v.shape for k, v in arrays.items()}
    {'weight': (2, 3), 'bias': (2,)}
    >>> class Run(h5m.TypedFile):  # doctest: +SKIP
    ...     ckpt = h5m.features.TensorDict(model.state_dict())
    >>> state = h5m.features.TensorDict.format(model.state_dict())
    >>> run.ckpt.add("epoch-1", state)  # doctest: +SKIP
    """

    __re__ = r"(?i)\.(pt|pth|ckpt)$"
    __grp_t__ = (to_tensors,)

    def __init__(self, state_dict: Mapping[str, Any] | None = None, pattern: str | None = None):
        if pattern is not None:
            self.__re__ = pattern
        self.__ds_kwargs__ = {
            str(key): {"compression": "lzf", "chunks": tuple(value.shape) or (1,)}
            for key, value in (state_dict or {}).items()
            if hasattr(value, "shape") and all(int(n) > 0 for n in value.shape)
        }

    def load(self, source: str) -> dict[str, Any]:
        """Read the checkpoint ``source`` into a dict of numpy arrays."""
        torch = _torch()
        with open_seekable(source) as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        if isinstance(state, torch.Tensor):
            state = {"tensor": state}
        if not isinstance(state, Mapping):
            raise TypeError(f"{source!r} holds a {type(state).__name__}, not a state dict")
        return _format(state, torch)

    @staticmethod
    def format(state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """A state dict as the dict of numpy arrays that ``file.add`` stores.

        Examples
        --------
        >>> import torch, h5dask as h5m
        >>> h5m.features.TensorDict.format({"step": torch.tensor(3)})
        {'step': array([3])}
        """
        return _format(state_dict, _torch())
