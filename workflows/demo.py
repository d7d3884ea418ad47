"""The h5dask demo: real images to a typed file, then read, analyse and serve it.

1. writes a small collection of labelled PNG tiles cut from scikit-image's
   sample photographs (``demo-output/images/<class>/<n>.png``);
2. builds ``demo-output/dataset.h5`` from that folder on the embedded local
   dask cluster, with a progress bar;
3. prints the file's 2-D table (features down, ids across);
4. computes the mean colour of each class lazily with dask;
5. serves one shuffled batch to PyTorch;
6. says where the file is.

Usage: ``python workflows/demo.py [--out demo-output] [--per-class 40] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_dataset import build  # noqa: E402
from samples import write_samples  # noqa: E402

import h5dask as h5m  # noqa: E402


def class_means(file: h5m.TypedFile) -> dict[str, np.ndarray]:
    """Mean RGB colour of each class, computed lazily over the whole file."""
    pixels = file.images.to_dask()  # (n, 64, 64, 3) uint8, nothing read yet
    per_image = pixels.mean(axis=(1, 2)).compute()
    labels = file.labels[:]
    names = file.labels.attrs["vocabulary"]
    return {name: per_image[labels == k].mean(axis=0) for k, name in enumerate(names)}


def one_batch(file: h5m.TypedFile) -> dict:
    """The first batch of a shuffled DataLoader over images and labels."""
    loader = file.serve(
        dict(
            x=h5m.Input(key="images", getter=h5m.GetId()),
            y=h5m.Target(key="labels", getter=h5m.GetId()),
        ),
        batch_size=16,
        shuffle=True,
    )
    return next(iter(loader))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    parser.add_argument("--per-class", type=int, default=40, help="images per class (default 40)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    parser.add_argument("--scheduler", default=None, help="'threads', 'sync' or a dask address")
    args = parser.parse_args(argv)

    out = Path(args.out)
    images = out / "images"
    write_samples(images, args.per_class)
    print(f"1. wrote {args.per_class} real image tiles per class under {images}/")

    print("2. building the typed file on the embedded dask cluster")
    file = build(
        str(images), str(out / "dataset.h5"), n_workers=args.workers, scheduler=args.scheduler
    )

    print("3. the file's table: features down, ids across")
    file.info()

    print("4. mean colour of each class, computed lazily with dask")
    for name, rgb in class_means(file).items():
        print(f"   {name:>8}: R {rgb[0]:6.1f}  G {rgb[1]:6.1f}  B {rgb[2]:6.1f}")

    batch = one_batch(file)
    print(
        f"5. one batch for PyTorch: x {tuple(batch['x'].shape)} {batch['x'].dtype}, "
        f"y {batch['y'].view(-1).tolist()}"
    )

    print(f"6. the file is {file.filename}; open it with h5dask.TypedFile({file.filename!r})")


if __name__ == "__main__":
    main()
