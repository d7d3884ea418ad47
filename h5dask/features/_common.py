"""Helpers shared by the built-in features: optional imports and opening sources."""

from __future__ import annotations

import importlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import IO, Any

__all__ = ["require", "open_seekable", "read_bytes"]


def require(module: str, package: str, extra: str, user: str) -> ModuleType:
    """Import an optional dependency or explain how to install it.

    Parameters
    ----------
    module : str
        The module to import, e.g. ``"PIL.Image"``.
    package : str
        The name of its distribution, e.g. ``"Pillow"``.
    extra : str
        The h5dask extra that installs it, e.g. ``"images"``.
    user : str
        What needs it, for the message, e.g. ``"h5dask.features.Image"``.

    Raises
    ------
    ImportError
        Naming ``pip install h5dask[extra]`` when the module is missing.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{user} needs {package}, which is not installed: pip install h5dask[{extra}]"
        ) from exc


def _is_seekable(f: Any) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


@contextmanager
def open_seekable(source: str) -> Iterator[IO[bytes]]:
    """Open a local path or fsspec URL as a binary file that supports ``seek``.

    Streams that cannot seek are read into memory first, since Pillow,
    soundfile, numpy and torch all seek in the files they decode.
    """
    from ..sources import open_source

    with open_source(source) as f:
        yield f if _is_seekable(f) else io.BytesIO(f.read())


def read_bytes(source: str) -> bytes:
    """Return every byte of a local path or fsspec URL."""
    from ..sources import open_source

    with open_source(source) as f:
        return f.read()
