"""Named exceptions of h5dask.

Every exception raised on purpose by h5dask derives from :class:`H5DaskError`.
Errors about one source and one feature carry both as attributes and name them
in their message, so a failure among millions of sources can be traced back.
"""

from __future__ import annotations

__all__ = [
    "H5DaskError",
    "SourceFeatureError",
    "LoadError",
    "LoadTimeoutError",
    "ResultTypeError",
    "ConcatError",
    "OverwriteError",
    "UnknownIdError",
    "ReadOnlyError",
    "SchemaError",
    "FileFormatError",
    "ExternalFileError",
    "SourceError",
    "DiskFullError",
    "CommitError",
    "FileLockedError",
    "StaleFileError",
    "WorkerError",
    "describe",
]


class H5DaskError(Exception):
    """Base class of every error raised by h5dask."""


class SourceFeatureError(H5DaskError):
    """An error tied to one source and one feature.

    Parameters
    ----------
    source : str
        The source (its id) being processed.
    feature : str
        The path of the feature in the file, e.g. ``"data/images"``.
    cause : str
        What went wrong, in words.
    """

    def __init__(self, source: str, feature: str, cause: str):
        self.source = source
        self.feature = feature
        self.cause = cause
        super().__init__(f"source {source!r}, feature {feature!r}: {cause}")

    def __reduce__(self):
        return type(self), (self.source, self.feature, self.cause)


class LoadError(SourceFeatureError):
    """``Feature.load`` failed; the original exception is chained as ``__cause__``."""


class LoadTimeoutError(LoadError, TimeoutError):
    """``Feature.load`` ran longer than ``create(..., timeout=)`` allows."""


class ResultTypeError(LoadError, TypeError):
    """``Feature.load`` returned something h5dask cannot store."""


class ConcatError(SourceFeatureError, ValueError):
    """A result's trailing shape or dtype cannot be concatenated to its dataset."""


class OverwriteError(SourceFeatureError, ValueError):
    """An ``add`` for an id that holds data in a feature already; nothing of it was buffered.

    ``set`` replaces the data explicitly, ``append`` adds rows to it.
    """


class UnknownIdError(H5DaskError, KeyError):
    """An id that the file does not hold."""

    def __init__(self, id: object, filename: str = "", feature: str = ""):
        self.id = id
        self.filename = filename
        self.feature = feature
        what = f", feature {feature!r}" if feature else ""
        where = f" in {filename!r}" if filename else ""
        super().__init__(f"unknown id {id!r}{what}{where}: the file holds no such source")

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return type(self), (self.id, self.filename, self.feature)


class ReadOnlyError(H5DaskError, PermissionError):
    """A write to a file opened read-only."""


class SchemaError(H5DaskError, ValueError):
    """A schema that cannot describe a file (empty, badly named, not features)."""


class FileFormatError(H5DaskError, OSError):
    """A file that is not HDF5, or whose h5dask tables are inconsistent."""


class ExternalFileError(FileFormatError):
    """A dataset whose data HDF5 would read from another file (external storage, a
    virtual dataset), refused unless the file is opened with ``allow_external=True``."""


class SourceError(H5DaskError, OSError):
    """A source that cannot be listed or opened (missing file, unreachable URL)."""


class DiskFullError(H5DaskError, OSError):
    """Not enough free disk space to commit the next batch; nothing of it was written."""


class CommitError(H5DaskError, OSError):
    """A batch of sources could not be committed; the file holds every commit before it.

    Parameters
    ----------
    filename : str
        The file written to.
    sources : list of str
        The ids of the batch, none of which is committed.
    cause : str
        What went wrong, in words; the original exception is chained as ``__cause__``.
    """

    def __init__(self, filename: str, sources: list[str], cause: str):
        self.filename = filename
        self.sources = list(sources)
        self.cause = cause
        which = (
            repr(self.sources[0])
            if len(self.sources) == 1
            else (f"{self.sources[0]!r} to {self.sources[-1]!r}")
        )
        super().__init__(
            f"file {filename!r}: could not commit {len(self.sources)} sources ({which}): {cause}. "
            "The file holds every source committed before them; add them again, or resume "
            "with create(..., mode='a')"
        )

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return type(self), (self.filename, self.sources, self.cause)


class FileLockedError(H5DaskError, OSError):
    """Another writer holds the file's writer session (see :mod:`h5dask.session`)."""


class StaleFileError(H5DaskError):
    """The file under a dask collection moved or changed since the collection was built.

    Parameters
    ----------
    filename : str
        The file the collection reads.
    feature : str
        The feature (or dataset) path, e.g. ``"data/images"``.
    cause : str
        What changed, in words.
    """

    def __init__(self, filename: str, feature: str, cause: str):
        self.filename = filename
        self.feature = feature
        self.cause = cause
        super().__init__(f"file {filename!r}, feature {feature!r}: {cause}")

    def __reduce__(self):
        return type(self), (self.filename, self.feature, self.cause)


class WorkerError(H5DaskError):
    """Worker processes died while loading sources (a feature crashed them, they ran out of
    memory or were killed) and running the loads again did not help, or the embedded
    cluster did not start. What was committed before stays; ``mode="a"`` resumes.

    Parameters
    ----------
    sources : list of str
        The sources whose loads were running (empty if none was).
    features : list of str
        The features of the schema (which one was running died with its process).
    cause : str
        What happened, in words.
    """

    def __init__(self, sources: list[str], features: list[str], cause: str):
        self.sources = sources
        self.features = features
        self.cause = cause
        names = ", ".join(map(repr, features))
        if not sources:
            what = f"features {names}"
        elif len(sources) == 1:
            what = f"source {sources[0]!r}, features {names}"
        else:
            what = f"sources {sources[0]!r} to {sources[-1]!r} ({len(sources)}), features {names}"
        super().__init__(f"{what}: {cause}")

    def __reduce__(self):
        return type(self), (self.sources, self.features, self.cause)


def describe(exc: BaseException) -> str:
    """``"TypeName: message"`` of ``exc``, even when its ``str()`` raises.

    Examples
    --------
    >>> describe(ValueError("no good"))
    'ValueError: no good'
    >>> class Odd(Exception):
    ...     def __str__(self):
    ...         raise RuntimeError("no str")
    >>> describe(Odd())
    'Odd: <str() of the exception raised RuntimeError>'
    """
    try:
        message = str(exc)
    except Exception as failed:
        message = f"<str() of the exception raised {type(failed).__name__}>"
    return f"{type(exc).__name__}: {message}"
