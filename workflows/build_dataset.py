"""Build a typed file of images (or sounds) and their folder labels.

SOURCE is a directory, a glob or a URL prefix (``s3://bucket/imgs/``,
``http://host/dir/``) whose sub-folders name the classes. Runs on the embedded
local dask cluster by default, or on any cluster with ``--scheduler ADDRESS``.

Example::

    python workflows/build_dataset.py data/images dataset.h5 --size 64
"""

from __future__ import annotations

import argparse

import h5dask as h5m
from h5dask.features import DirLabels, Image, Sound


class ImageDataset(h5m.TypedFile):
    """Images resized to a square, and integer labels from their folders."""

    images = Image(size=64)
    labels = DirLabels()


class SoundDataset(h5m.TypedFile):
    """Mono sounds at one sample rate, and integer labels from their folders."""

    sounds = Sound(sr=16000, mono=True)
    labels = DirLabels()


def build(
    source: str,
    out: str,
    kind: str = "images",
    size: int = 64,
    sr: int = 16000,
    **create_kwargs: object,
) -> h5m.TypedFile:
    """Build ``out`` from ``source``; ``create_kwargs`` go to ``TypedFile.create``."""
    if kind == "images":
        schema = {"images": Image(size=size), "labels": DirLabels()}
        return ImageDataset.create(out, source, schema=schema, **create_kwargs)
    schema = {"sounds": Sound(sr=sr, mono=True), "labels": DirLabels()}
    return SoundDataset.create(out, source, schema=schema, **create_kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("source", help="directory, glob or URL prefix of class folders")
    parser.add_argument("out", help="the .h5 file to write")
    parser.add_argument("--kind", choices=("images", "sounds"), default="images")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--sr", type=int, default=16000, help="sample rate of sounds")
    parser.add_argument("--workers", type=int, default=None, help="workers of the local cluster")
    parser.add_argument("--scheduler", default=None, help="'threads', 'sync' or a dask address")
    parser.add_argument("--mode", choices=("w", "a"), default="w", help="'a' resumes a build")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    args = parser.parse_args(argv)
    file = build(
        args.source,
        args.out,
        args.kind,
        args.size,
        args.sr,
        n_workers=args.workers,
        scheduler=args.scheduler,
        mode=args.mode,
        on_error=args.on_error,
    )
    file.info()
    for failure in file.errors:
        print(f"skipped {failure.source!r} ({failure.feature}): {failure.message}")


if __name__ == "__main__":
    main()
