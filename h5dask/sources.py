"""Sources and their ids: expanding directories and globs, opening files and URLs.

A *source* is any string handed to ``Feature.load``. Directories (local or fsspec URLs)
are walked recursively and globs are expanded, both through fsspec; every other string
is an id as it is (``"0"`` or ``"run-3"`` are fine sources).

Notes
-----
- A local source is a directory when it is one (links followed); a missing path is kept,
  to fail when loaded, unless it ends with a separator. Rather than one ``stat`` per
  source (a network round trip each on NFS or Lustre), each folder holding sources is
  listed once, if it holds at most :data:`LISTED_PER_SOURCE` entries per source in it;
  otherwise each of its sources gets a ``stat``. A listing matches names exactly: on a
  case-insensitive file system, spell a directory as it is spelled on disk.
  A URL is listed when it ends with ``"/"`` or holds glob characters; otherwise it is
  asked ``fs.isdir`` only where that is cheap (``memory``, ``file``): a plain
  ``http://host/dir`` is a file, and many plain URLs cost no network round trip.
- Folders that a glob matches are walked like directories.
- Glob characters are ``*``, ``?`` and ``[``, except for ``http(s)`` URLs where ``?``
  starts a query string, as in fsspec's HTTP filesystem.
- Hidden files and folders (a path component below the given prefix starting with
  ``"."``) are skipped; hidden folders are pruned, not walked. A glob whose own
  component starts with ``"."`` (e.g. ``"logs/.*"``) may match hidden names.
- HTTP listing is fsspec's: the links (``href``) of the HTML page at the URL, links
  ending with ``"/"`` being directories. It suits index pages such as those of
  ``python -m http.server``, nginx ``autoindex`` or Apache; links carrying a query or a
  fragment (Apache's column-sorting links) and links back to the folder itself are
  ignored. Only linked files are found: a folder holding an ``index.html`` is listed as
  that page's links. Names are as linked, so percent-encoded (``a%20b.png``), which
  fsspec opens. Sub-folders are fetched one by one; their errors are skipped by
  fsspec's walk, only the given prefix must be listable.
- Chained URLs (``"simplecache::s3://bucket/key"``) are passed through unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import IO, Any, Union

import fsspec

from . import format as fmt
from .errors import SourceError

__all__ = ["expand_sources", "open_source", "source_protocol", "memory_source"]

SourceLike = Union[str, "os.PathLike[str]"]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_MEMORY = re.compile(r"(^|::)memory://")
_MAGIC = re.compile(r"[*?\[]")
_HTTP_MAGIC = re.compile(r"[*\[]")
_CHEAP_ISDIR = frozenset({"memory", "file", "local"})
_HTTP = frozenset({"http", "https"})
_SEPARATORS = ("/", os.sep)
LISTED_PER_SOURCE = 8  # folder entries read per local source, before stat is cheaper


def source_protocol(source: SourceLike) -> str:
    """Return the fsspec protocol of a source, ``"file"`` for local paths and plain ids.

    Parameters
    ----------
    source : str or os.PathLike
        A source string, local path or URL.

    Returns
    -------
    str
        The protocol, e.g. ``"s3"``; for chained URLs, the first one.

    Examples
    --------
    >>> source_protocol("memory://bucket/a.png")
    'memory'
    >>> source_protocol("data/a.png"), source_protocol("run-3")
    ('file', 'file')
    >>> source_protocol("simplecache::https://example.org/a.png")
    'simplecache'
    """
    s = _to_str(source)
    if "::" in s and "://" in s:
        s = s.split("::", 1)[0]
        if "://" not in s:
            return s
    m = _URL.match(s)
    return m.group(1) if m else "file"


def memory_source(ids: list[str]) -> str | None:
    """The first of ``ids`` in fsspec's ``memory://`` filesystem (alone or in a chain of
    protocols), which lives in one process only; None if there is none.

    Examples
    --------
    >>> memory_source(["data/a.png", "simplecache::memory://b/c.png", "memory://d"])
    'simplecache::memory://b/c.png'
    >>> memory_source(["run-3", "s3://bucket/memory://x"]) is None
    True
    """
    for start in range(0, len(ids), 4096):  # ids without "memory:" (the usual) in bulk
        some = ids[start : start + 4096]
        if "memory:" in "\0".join(some):
            found = next((id for id in some if _MEMORY.search(id)), None)
            if found is not None:
                return found
    return None


def expand_sources(
    sources: SourceLike | Iterable[SourceLike],
    *,
    pattern: str | re.Pattern[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Expand sources into the ordered list of ids.

    Directories (local paths, or URLs ending with ``"/"``) are walked recursively, globs
    are expanded, hidden files and folders are skipped, and anything else is kept as it
    is. An expanded id is the given prefix, spelled as given, joined with the relative
    path, so it keeps the protocol of a URL.

    Parameters
    ----------
    sources : str, os.PathLike or iterable of them
        Paths, directories, globs, fsspec URLs or plain strings.
    pattern : str or re.Pattern, optional
        Keep only the expanded entries in which this regex is found (``re.search``);
        sources given as they are are always kept.
    storage_options : dict, optional
        Passed to the fsspec filesystems used to list URLs.

    Returns
    -------
    list of str
        Ids in a stable order: the order of ``sources``, each expansion sorted.
        Repeated ids are dropped (keeping the first) with a warning; so is a
        directory or glob that yields nothing, when other sources yield ids.
        A list whose strings are all kept as they are is returned itself, not
        a copy (a million ids take 8 MB of pointers).

    Raises
    ------
    SourceError
        Nothing given or nothing found, an unknown protocol, a local path ending with a
        separator that is not a directory, or a prefix that cannot be listed (the
        original exception is chained). Messages name the sources.
    TypeError
        A source that is neither a string nor a path.

    Examples
    --------
    >>> import fsspec
    >>> fs = fsspec.filesystem("memory")
    >>> for name in ["imgs/b.png", "imgs/sub/a.png", "imgs/.cache/x.png"]:
    ...     fs.pipe(f"memory://doc-bucket/{name}", b"...")
    >>> expand_sources(["memory://doc-bucket/imgs/", "run-3"])
    ['memory://doc-bucket/imgs/b.png', 'memory://doc-bucket/imgs/sub/a.png', 'run-3']
    >>> expand_sources("memory://doc-bucket/imgs/*.png")
    ['memory://doc-bucket/imgs/b.png']
    >>> expand_sources("memory://doc-bucket/imgs", pattern=r"sub/")
    ['memory://doc-bucket/imgs/sub/a.png']
    >>> fs.rm("/doc-bucket", recursive=True)
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    elif isinstance(sources, (bytes, bytearray)):
        raise TypeError("sources must be str, os.PathLike or an iterable of them, not bytes")
    search = re.compile(pattern).search if pattern is not None else None
    if not isinstance(sources, (list, tuple)):
        sources = list(sources)
    lister = _Lister(storage_options or {}, _LocalDirs(map(_to_str, sources)))
    out: list[str] = []
    empty: list[str] = []
    as_given = isinstance(sources, list)  # a list of ids as they are: returned, not copied
    for source in sources:
        s = _to_str(source)
        expanded = lister.expand(s)
        if expanded is None:
            out.append(s)
            as_given = as_given and s is source
            continue
        as_given = False
        if search is not None:
            expanded = [e for e in expanded if search(e)]
        if not expanded:
            empty.append(s)
        _check_storable(expanded)
        out.extend(expanded)
    if not sources:
        raise SourceError(
            "no sources given (a file filled by add() alone is opened with mode='w', "
            "not created from sources)"
        )
    if empty and out:
        warnings.warn(f"sources with no files{_filtered(pattern)}: {_some(empty)}")
    if not out:
        raise SourceError(f"no sources found{_filtered(pattern)}: nothing in {_some(empty)}")
    unique = dict.fromkeys(out)
    if len(unique) == len(out):
        return sources if as_given else out  # type: ignore[return-value]
    n = len(out) - len(unique)
    warnings.warn(f"dropped {n} duplicate source id{'s' * (n > 1)}, keeping the first")
    return list(unique)


@contextlib.contextmanager
def open_source(source: SourceLike, mode: str = "rb", **storage_options: Any) -> Iterator[IO]:
    """Open a local path or an fsspec URL as a binary file object.

    Parameters
    ----------
    source : str or os.PathLike
        A local path or any fsspec URL (chained URLs too).
    mode : str, default "rb"
        A binary mode.
    **storage_options
        Passed to the fsspec filesystem.

    Yields
    ------
    file-like
        The open file, closed when the ``with`` block ends.

    Raises
    ------
    SourceError
        The source cannot be opened (missing file, unreachable URL, unknown protocol);
        the message names the source and the cause, which is chained.

    Examples
    --------
    >>> import fsspec
    >>> fsspec.filesystem("memory").pipe("memory://doc-bucket/a.bin", b"abc")
    >>> with open_source("memory://doc-bucket/a.bin") as f:
    ...     f.read()
    b'abc'
    >>> fsspec.filesystem("memory").rm("/doc-bucket", recursive=True)
    """
    s = _to_str(source)
    try:
        ofile = fsspec.open(s, mode, **storage_options)
        f = ofile.__enter__()
    except Exception as exc:
        raise SourceError(f"cannot open source {s!r}: {_describe(exc)}") from exc
    try:
        yield f
    finally:
        ofile.__exit__(None, None, None)


# -- helpers -------------------------------------------------------------------------


def _to_str(source: object) -> str:
    if type(source) is str and source and source.isascii() and "\0" not in source:
        return source  # the fast path of millions of plain ids
    s = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(s, str):
        raise TypeError(
            f"a source must be a str or an os.PathLike, not {type(source).__name__}: "
            f"{source!r} (convert plain ids with str())"
        )
    if not s:
        raise SourceError("empty string given as a source")
    _check_storable([s])
    return s


def _check_storable(ids: list[str]) -> None:
    """Raise :class:`SourceError` for an id that the id table cannot store."""
    for start in range(0, len(ids), 4096):  # ASCII without NUL (the usual ids) in bulk
        some = "".join(ids[start : start + 4096])
        if some.isascii() and "\0" not in some:
            continue
        for id in ids[start : start + 4096]:
            problem = fmt.id_problem(id)
            if problem:
                raise SourceError(f"source {id!r} {problem}; rename it")


class _Lister:
    """Expands sources one by one, caching protocol checks and filesystems."""

    def __init__(self, options: dict[str, Any], local_dirs: _LocalDirs):
        self.options = options
        self.local_dirs = local_dirs
        self.known: dict[str, bool] = {}
        self.filesystems: dict[str, fsspec.AbstractFileSystem] = {}

    def fs(self, protocol: str) -> fsspec.AbstractFileSystem:
        if protocol not in self.filesystems:
            options = self.options if protocol != "file" else {}
            self.filesystems[protocol] = fsspec.filesystem(protocol, **options)
        return self.filesystems[protocol]

    def expand(self, s: str) -> list[str] | None:
        """The ids of one source, or None when it is kept as it is."""
        if _plain_local(s):
            return _walk(self.fs("file"), s) if self.local_dirs.isdir(s) else None
        m = _URL.match(s) if "://" in s else None
        if m is None:
            if "::" in s and "://" in s:
                return None  # a chained URL
            if _MAGIC.search(s):
                return _glob(self.fs("file"), s)
            if os.path.isdir(s):
                return _walk(self.fs("file"), s)
            raise SourceError(f"source {s!r} ends with a separator but is not a directory")
        protocol = m.group(1)
        if protocol not in self.known:
            self.known[protocol] = protocol in fsspec.available_protocols()
        if not self.known[protocol]:
            raise SourceError(f"source {s!r}: protocol {protocol!r} is not known to fsspec")
        magic, end = _MAGIC, len(s)
        if protocol in _HTTP:  # "?" starts a query string, where "*" or "[" are no glob
            magic, end = _HTTP_MAGIC, len(re.split(r"[?#]", s, maxsplit=1)[0])
        is_glob = magic.search(s, 0, end) is not None
        if not (is_glob or s.endswith("/") or protocol in _CHEAP_ISDIR):
            return None
        try:
            fs = self.fs(protocol)
            if is_glob:
                return _glob(fs, s, magic)
            if s.endswith("/") or fs.isdir(s):
                return _walk(fs, s)
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"cannot list source {s!r}: {_describe(exc)}") from exc
        return None


def _plain_local(s: str) -> bool:
    """Whether ``s`` is a local path with no glob and no separator at its end."""
    if "://" in s and (_URL.match(s) or "::" in s):
        return False  # a URL or a chained URL
    return not s.endswith(_SEPARATORS) and not _MAGIC.search(s)


class _LocalDirs:
    """Tells which plain local paths are directories, listing each of their folders once
    (see the module's notes). It keeps the names of sub-folders only, never one per file."""

    def __init__(self, sources: Iterable[str]):
        self.counts = Counter(_split(s)[0] for s in sources if _plain_local(s))
        self.subdirs: dict[str, frozenset[str] | None] = {}

    def isdir(self, path: str) -> bool:
        folder, name = _split(path)
        if folder not in self.subdirs:
            most = LISTED_PER_SOURCE * self.counts[folder]
            self.subdirs[folder] = _subdirs(folder or os.curdir, most)
        subdirs = self.subdirs[folder]
        if subdirs is None or name in (os.curdir, os.pardir):
            return os.path.isdir(path)
        return name in subdirs


def _subdirs(folder: str, most: int) -> frozenset[str] | None:
    """The names of the directories in ``folder`` (links to one included, as
    :func:`os.path.isdir` follows them), or None if it holds more than ``most`` entries
    or cannot be listed."""
    names = []
    try:
        with os.scandir(folder) as entries:
            for k, entry in enumerate(entries):
                if k == most:
                    return None
                if entry.is_dir():
                    names.append(entry.name)
    except OSError:
        return None
    return frozenset(names)


def _split(path: str) -> tuple[str, str]:
    """:func:`os.path.split`, faster where ``/`` is the only separator."""
    if os.altsep:
        return os.path.split(path)
    head, sep, name = path.rpartition("/")
    return head.rstrip("/") or sep, name


def _walk(fs: fsspec.AbstractFileSystem, top: str) -> list[str]:
    """Sorted ids of the non-hidden files below directory ``top``, spelled from ``top``."""
    return sorted(_join(top, rel) for rel in _files_below(fs, top))


def _files_below(fs: fsspec.AbstractFileSystem, top: str) -> Iterator[str]:
    """Relative paths of the non-hidden files below ``top``; errors listing it raise."""
    root = fs._strip_protocol(top).rstrip("/")
    http = not _protocols(fs).isdisjoint(_HTTP)
    for dirpath, dirs, files in fs.walk(top, on_error="raise", detail=True):
        below = dirpath.rstrip("/") + "/"
        for d, info in list(dirs.items()):
            # prune hidden folders, and links of an HTML index back to the folder itself
            if d.startswith(".") or not info["name"].rstrip("/").startswith(below):
                del dirs[d]
        reldir = dirpath[len(root) :].strip("/") if dirpath.startswith(root) else dirpath
        for name in files:
            if not name or name.startswith(".") or (http and ("?" in name or "#" in name)):
                continue
            yield f"{reldir}/{name}" if reldir else name


def _glob(fs: fsspec.AbstractFileSystem, s: str, magic: re.Pattern[str] = _MAGIC) -> list[str]:
    """Sorted ids of the non-hidden files matching glob ``s``; matched folders are walked."""
    cut = s.rfind("/", 0, magic.search(s).start()) + 1
    prefix = s[:cut]  # the user's spelling of the fixed part, up to its last "/"
    parts = s[cut:].split("/")
    root = fs._strip_protocol(prefix or ".").rstrip("/")
    found: set[str] = set()
    for name, info in fs.glob(s, detail=True).items():
        name = name.rstrip("/")
        rel = name[len(root) :].lstrip("/") if name.startswith(root) else name
        comps = rel.split("/")
        if any(c.startswith(".") and not _dot_ok(parts, i) for i, c in enumerate(comps)):
            continue
        if info.get("type") == "directory":
            found.update(f"{rel}/{r}" for r in _files_below(fs, name))
        else:
            found.add(rel)
    if not found and not _is_local(fs):
        fs.ls(prefix)  # surface an unreachable or missing prefix as an error
    return sorted(_join(prefix, rel) for rel in found)


def _dot_ok(parts: list[str], i: int) -> bool:
    """Whether glob component ``i`` asks for hidden names (it starts with ".")."""
    return i < len(parts) and "**" not in parts[:i] and parts[i].startswith(".")


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def _join(prefix: str, rel: str) -> str:
    return prefix + rel if not prefix or prefix.endswith(("/", os.sep)) else f"{prefix}/{rel}"


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) not in text:
        text += f" (caused by {type(cause).__name__}: {cause})"
    return text


def _filtered(pattern: str | re.Pattern[str] | None) -> str:
    if pattern is None:
        return ""
    return f" matching pattern {getattr(pattern, 'pattern', pattern)!r}"


def _some(items: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")
