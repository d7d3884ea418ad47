"""Starting worker processes without running the user's main script again.

``spawn`` and ``forkserver`` start a child by importing the parent's main module
(the "safe importing of main module" rule of :mod:`multiprocessing`), so a
script without ``if __name__ == "__main__":`` runs itself again in every child,
and a build it starts there fails (distributed's ``Nanny failed to start``, a
``BrokenProcessPool``). h5mapper's scripts have no such guard: they ran on
plain fork, which imports nothing.

h5dask's workers never need the main module: whatever they run travels
pickled by value (cloudpickle, which dask and distributed use for objects of
``__main__``). So while h5dask starts its worker processes, the main module
hides the two attributes that tell a child where it lives.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import H5DaskError

__all__ = ["main_not_reimported", "refuse_reimported_main"]

_MISSING = object()


@contextmanager
def main_not_reimported() -> Iterator[None]:
    """Within this block, children started by spawn or forkserver do not import ``__main__``.

    Hides ``__main__.__spec__`` and ``__main__.__file__`` (what
    :func:`multiprocessing.spawn.get_preparation_data` reads) and puts them back
    afterwards. Only for processes whose work is pickled by value.

    Examples
    --------
    >>> import multiprocessing
    >>> from h5dask.spawning import main_not_reimported
    >>> with main_not_reimported():
    ...     pool = multiprocessing.get_context("spawn").Pool(1)  # doctest: +SKIP
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {name: main.__dict__.get(name, _MISSING) for name in ("__spec__", "__file__")}
    main.__spec__ = None
    main.__dict__.pop("__file__", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                main.__dict__.pop(name, None)
            else:
                main.__dict__[name] = value


def refuse_reimported_main(what: str) -> None:
    """Raise if this runs in a child process that imports the parent's main script again.

    Such a child (spawn, forkserver) runs a script without
    ``if __name__ == "__main__":`` from the top: left alone, ``create`` would
    rebuild the parent's file there, in mode ``"w"`` truncating it under the
    parent.

    Raises
    ------
    H5DaskError
        Saying what to put under the guard.
    """
    frame = sys._getframe(1)
    while frame is not None:  # multiprocessing imports the main script as "__mp_main__"
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
            raise H5DaskError(
                f"{what} runs again in a child process: it imports the main script "
                f"{frame.f_code.co_filename!r} from the top, as spawn and forkserver do. Put "
                'the code that builds and computes under `if __name__ == "__main__":`'
            )
        frame = frame.f_back
