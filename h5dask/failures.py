"""Failures recorded in a file by ``create(..., on_error="skip")``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import h5py
import numpy as np

from . import format as fmt
from .errors import describe

__all__ = ["Failure", "record_failures", "read_failures"]

FIELDS = ("source", "feature", "message")


@dataclass(frozen=True)
class Failure:
    """One source that a feature could not load or store."""

    source: str
    feature: str
    message: str

    @classmethod
    def from_error(cls, error: Exception, source: str) -> Failure:
        """The record of ``error``, an h5dask error or any exception raised for ``source``.

        Its message is made storable: NUL characters and what is not UTF-8
        (an undecodable file name) are written as escapes.
        """
        feature = getattr(error, "feature", "")
        message = getattr(error, "cause", None) or describe(error)
        storable = message.encode("utf-8", "backslashreplace").decode("utf-8").replace("\0", "\\0")
        return cls(getattr(error, "source", source), feature, storable)


def record_failures(f: h5py.File, failures: Iterable[Failure]) -> None:
    """Append ``failures`` to the file's ``/__errors__`` table."""
    failures = list(failures)
    if not failures:
        return
    group = f.require_group(fmt.ERRORS)
    for field in FIELDS:
        if field not in group:
            group.create_dataset(
                field, shape=(0,), maxshape=(None,), dtype=fmt.UTF8, chunks=(1024,)
            )
        column = np.array([getattr(x, field) for x in failures], dtype=object)
        fmt.append_rows(group[field], column)


def read_failures(f: h5py.File, allow_external: bool = False) -> list[Failure]:
    """Every failure recorded in the file, oldest first.

    Raises
    ------
    ExternalFileError
        A column reads another file (see :func:`h5dask.format.check_local`).
    """
    if fmt.ERRORS not in f:
        return []
    group = f[fmt.ERRORS]
    columns = [fmt.check_local(group[field], allow_external).asstr()[:] for field in FIELDS]
    return [Failure(*row) for row in zip(*columns, strict=True)]
