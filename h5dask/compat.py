"""h5mapper's public helpers, so that its code runs with ``import h5dask as h5m``.

Every name of h5mapper 0.3.3's modules' ``__all__`` that is not already an
h5dask class lives here (``TypedFile``, ``Feature``, the getters... are the
library's own) and is exported at the top level. Where h5dask's file format
differs, the constants name h5dask's layout: ``SRC_KEY`` is the group of the
id table in both, ``NP_KEY`` and ``REF_KEY`` are a feature's ``values`` and
``refs`` datasets (h5mapper's ``__arr__`` and ``__ref__``; see
:mod:`h5dask.legacy` for its files).
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cloudpickle
import numpy as np
from tqdm.auto import tqdm

from . import format as fmt
from .spawning import main_not_reimported

if TYPE_CHECKING:
    from .feature import Feature
    from .proxy import DatasetProxy
    from .typed_file import TypedFile

__all__ = [
    "NP_KEY",
    "REF_KEY",
    "SRC_KEY",
    "FileWalker",
    "Setter",
    "SourceTable",
    "apply_and_store",
    "as_temp",
    "depth_first_apply",
    "flatten_dict",
    "for_each",
    "in_mem",
    "null_regref",
    "process_batch",
    "tqdm",
    "typedfile",
]

SRC_KEY = fmt.IDS.split("/")[0]
NP_KEY = fmt.VALUES
REF_KEY = fmt.REFS
null_regref = None  # h5mapper's ref of "no data"; h5dask's ref tables give None there too
PARALLELISM = ("mp", "threads", "none")


# -- files -------------------------------------------------------------------------------------


def as_temp(filename: str) -> str:
    """A path named ``filename`` in a new temporary directory.

    Examples
    --------
    >>> import os, h5dask as h5m
    >>> path = h5m.as_temp("train.h5")
    >>> os.path.basename(path), os.path.isdir(os.path.dirname(path))
    ('train.h5', True)
    """
    return os.path.join(tempfile.mkdtemp(), filename)


def in_mem(cls: type[TypedFile]) -> TypedFile:
    """A new, empty file of type ``cls`` that lives in memory only (HDF5's core driver).

    Examples
    --------
    >>> import numpy as np, h5dask as h5m
    >>> class Logs(h5m.TypedFile):
    ...     loss = h5m.Array()
    >>> logs = h5m.in_mem(Logs)
    >>> logs.add("train", {"loss": np.arange(3.0)}).loss.get("train")
    array([0., 1., 2.])
    """
    path = os.path.join(tempfile.gettempdir(), f"in-mem-{uuid.uuid4().hex}.h5")  # never on disk
    return cls(path, "w", keep_open=True, driver="core", backing_store=False)


def typedfile(name: str, schema: Mapping[str, Feature]) -> type[TypedFile]:
    """A new :class:`~h5dask.TypedFile` subclass called ``name`` with the features of ``schema``.

    Examples
    --------
    >>> import h5dask as h5m
    >>> Logs = h5m.typedfile("Logs", {"loss": h5m.Array()})
    >>> Logs.__name__, list(Logs.__schema__)
    ('Logs', ['loss'])
    """
    from .typed_file import TypedFile

    return type(name, (TypedFile,), dict(schema))


class FileWalker:
    """The files under ``sources`` whose path matches ``regex``, hidden ones left out.

    Parameters
    ----------
    regex : str or re.Pattern
        Searched (:func:`re.search`) in each file's path.
    sources : str, os.PathLike or iterable of them
        Files, and directories walked recursively.
    abspath : bool
        Yield the absolute paths of the files found in directories.

    Raises
    ------
    FileNotFoundError
        On iteration, for a source that does not exist.

    Examples
    --------
    >>> import h5dask as h5m
    >>> files = list(h5m.FileWalker(r"\\.wav$", ["recordings/", "take.wav"]))  # doctest: +SKIP
    """

    def __init__(
        self,
        regex: str | re.Pattern[str],
        sources: str | os.PathLike | Iterable[str | os.PathLike] | None = None,
        abspath: bool = True,
    ):
        self._regex = re.compile(regex)
        self.sources = sources
        self.abspath = abspath

    def __iter__(self) -> Iterator[str]:
        if self.sources is None:
            return
        sources = [self.sources] if isinstance(self.sources, (str, os.PathLike)) else self.sources
        for source in sources:
            source = os.fspath(source)
            if not os.path.exists(source):
                raise FileNotFoundError(f"{source} does not exist.")
            if os.path.isdir(source):
                yield from self.walk_root(source)
            elif self.is_matching_file(source):
                yield source

    def walk_root(self, root: str) -> Iterator[str]:
        """The matching files under the directory ``root``, walked recursively."""
        for directory, _, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                if self.is_matching_file(path):
                    yield os.path.abspath(path) if self.abspath else path

    def is_matching_file(self, filename: str) -> bool:
        """Whether ``filename`` is not hidden and matches the pattern."""
        if os.path.basename(filename.strip("/")).startswith("."):
            return False
        return self._regex.search(filename) is not None


class SourceTable:
    """h5mapper's ``file.__src__``: ``.id`` is the array of every id, in file order.

    Examples
    --------
    >>> ids_with_x = file.__src__.id[file.x.refs[()].astype(bool)]  # doctest: +SKIP
    """

    def __init__(self, file: TypedFile):
        self.file = file

    @property
    def id(self) -> np.ndarray:
        return self.file.ids

    def __repr__(self) -> str:
        return f"<ids of {self.file.filename!r}: {len(self.file)}>"


# -- running a function over many items ----------------------------------------------------------


def for_each(
    iterable: Sequence[Any],
    f: Callable[[Any], Any],
    parallelism: str = "mp",
    n_workers: int | None = None,
    chunksize: int | None = None,
    **tqdm_kwargs: Any,
) -> Iterator[Any]:
    """Yield ``f(item)`` for each item, in order, computed in parallel, with a progress bar.

    Parameters
    ----------
    iterable : sequence
        The items.
    f : callable
        Sent to the workers with cloudpickle: lambdas and functions of
        ``__main__`` work.
    parallelism : {"mp", "threads", "none"}
        Worker processes, threads, or this thread.
    n_workers : int, optional
        Default: the number of cores.
    chunksize : int, optional
        Items a worker process takes at a time (default: an even share).
    **tqdm_kwargs
        Passed to :class:`tqdm.tqdm` (``desc``, ``disable``...).

    Examples
    --------
    >>> import h5dask as h5m
    >>> list(h5m.for_each(range(4), lambda x: x * x, parallelism="threads", disable=True))
    [0, 1, 4, 9]
    """
    if parallelism not in PARALLELISM:
        raise ValueError(f"parallelism must be one of {list(PARALLELISM)}, not {parallelism!r}")
    items = list(iterable)
    n_workers = n_workers or os.cpu_count() or 1
    tqdm_kwargs.setdefault("total", len(items))
    if parallelism == "none":
        yield from tqdm(map(f, items), **tqdm_kwargs)
        return
    if parallelism == "threads":
        with ThreadPoolExecutor(n_workers) as pool:
            yield from tqdm(pool.map(f, items), **tqdm_kwargs)
        return
    chunksize = chunksize or max(len(items) // n_workers, 1)
    with main_not_reimported(), _process_pool(n_workers) as pool:
        calls = pool.map(
            _call_pickled, [cloudpickle.dumps(f)] * len(items), items, chunksize=chunksize
        )
        yield from tqdm(calls, **tqdm_kwargs)


def _process_pool(n_workers: int) -> Executor:
    import multiprocessing

    import dask

    method = dask.config.get("multiprocessing.context", "spawn")
    return ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context(method))


def _call_pickled(payload: bytes, item: Any) -> Any:
    return cloudpickle.loads(payload)(item)


def apply_and_store(
    src: str, fdict: Mapping[str, Callable[[Any], Any]], proxy: DatasetProxy
) -> tuple[str, dict[str, Any]]:
    """``(src, {name: f(proxy.get(src))})``: each function of ``fdict`` on one id's data."""
    data = proxy.get(src)
    return src, {name: f(data) for name, f in fdict.items()}


# -- nested dicts and batches --------------------------------------------------------------------


def flatten_dict(dd: Any, separator: str = "/", prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level, its keys joined with ``separator``.

    Examples
    --------
    >>> import h5dask as h5m
    >>> h5m.flatten_dict({"a": {"b": 1, "c": {"d": 2}}, "e": 3})
    {'a/b': 1, 'a/c/d': 2, 'e': 3}
    """
    if not isinstance(dd, dict):
        return {prefix: dd}
    out: dict[str, Any] = {}
    for key, value in dd.items():
        name = f"{prefix}{separator}{key}" if prefix else key
        out.update(flatten_dict(value, separator, name))
    return out


def depth_first_apply(dict_like: Mapping[str, Any], func: Callable[[Any], Any]) -> dict[str, Any]:
    """``func`` applied to every leaf of a nested dict (values of the dict's own type recurse).

    Examples
    --------
    >>> import h5dask as h5m
    >>> h5m.depth_first_apply({"a": {"b": 1}, "c": 2}, lambda x: x * 10)
    {'a': {'b': 10}, 'c': 20}
    """
    return {
        key: depth_first_apply(value, func) if type(value) is type(dict_like) else func(value)
        for key, value in dict_like.items()
    }


def process_batch(
    batch: Any,
    test: Callable[[Any], bool] = lambda x: False,
    func: Callable[[Any], Any] = lambda x: x,
) -> Any:
    """``batch`` with ``func`` applied to every element, at any depth, for which ``test`` holds.

    Mappings, named tuples and sequences (not strings) are walked; mappings
    come back as dicts, sequences as lists, named tuples as their type.

    Examples
    --------
    >>> import h5dask as h5m
    >>> h5m.process_batch({"x": [1, "a", (2,)]}, lambda v: isinstance(v, int), lambda v: -v)
    {'x': [-1, 'a', [-2]]}
    """
    if test(batch):
        return func(batch)
    if isinstance(batch, Mapping):
        return {key: process_batch(value, test, func) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(process_batch(value, test, func) for value in batch))
    if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
        return [process_batch(value, test, func) for value in batch]
    return batch


@dataclass
class Setter:
    """Writes a value into data at an item, along ``dim``: h5mapper's batch setter.

    ``setter(data, item, value)`` writes ``value`` at ``[item, item + n)`` along
    ``dim`` (``n`` its length there), or at ``[item - n, item)`` when
    ``after_item`` is False, and returns ``n``. ``data`` is an array, a
    feature's proxy, or an :class:`~h5dask.Input` / :class:`~h5dask.Target`
    (its ``key``'s proxy is written).

    Examples
    --------
    >>> import numpy as np, h5dask as h5m
    >>> out = np.zeros(6)
    >>> h5m.Setter()(out, 2, np.ones(3)), out
    (3, array([0., 0., 1., 1., 1., 0.]))
    """

    dim: int = 0
    after_item: bool = True

    def __call__(self, data: Any, item: int, value: Any) -> int:
        target = getattr(data, "key", data)
        if isinstance(target, str):
            raise TypeError(f"Setter: {target!r} is a path; give the feature's proxy")
        n = np.shape(value)[self.dim]
        start = item if self.after_item else item - n
        target[(slice(None),) * self.dim + (slice(start, start + n),)] = value
        return n
