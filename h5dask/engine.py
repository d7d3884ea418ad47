"""Running ``Feature.load`` over many sources; yields results in id order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

from .errors import H5DaskError
from .extract import load_schema
from .feature import Feature

__all__ = ["run_loads", "load_one"]


def load_one(id: str, schema: dict[str, Feature]) -> Any:
    """The result of ``id``, or the h5dask error that its loading raised."""
    try:
        return load_schema(id, schema)
    except H5DaskError as exc:
        return exc


def run_loads(
    ids: list[str],
    schema: dict[str, Feature],
    n_workers: int | None,
    scheduler: Any,
    progress: bool,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(id, result or error)`` for every id, in order."""
    with tqdm(total=len(ids), disable=not progress, unit="src", desc="create") as bar:
        for id in ids:
            yield id, load_one(id, schema)
            bar.update()
