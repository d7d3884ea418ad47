"""Per-class statistics of an image dataset, computed lazily with dask.

Opens a typed file with ``images`` and ``labels`` features (as built by
``build_dataset.py``), and computes each class's count, mean colour and pixel
standard deviation out of core, on the embedded local dask cluster of worker
processes, or on any cluster with ``--scheduler ADDRESS``.

Example::

    python workflows/lazy_analysis.py dataset.h5 --workers 2
"""

from __future__ import annotations

import argparse
import contextlib

import dask.array as da
import numpy as np

import h5dask as h5m


def class_statistics(file: h5m.TypedFile) -> dict[str, dict[str, object]]:
    """Count, mean RGB and pixel std of each class, in one pass over the images."""
    pixels = file.images.to_dask().astype(np.float64)  # lazy: (n, ..., H, W, C)
    pixels = pixels.reshape((pixels.shape[0], -1, pixels.shape[-1]))
    labels = np.asarray(file.labels[:]).reshape(-1)
    names = file.labels.attrs["vocabulary"]
    onehot = da.from_array(np.eye(len(names))[labels], chunks=(pixels.chunks[0], -1))
    sums = da.einsum("nk,npc->kc", onehot, pixels)
    squares = da.einsum("nk,npc->kc", onehot, pixels**2)
    sums, squares = da.compute(sums, squares)
    counts = np.bincount(labels, minlength=len(names))
    n_pixels = counts[:, None] * pixels.shape[1]
    mean = sums / n_pixels
    std = np.sqrt(squares / n_pixels - mean**2)
    return {
        name: {"count": int(counts[k]), "mean": mean[k], "std": std[k]}
        for k, name in enumerate(names)
    }


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int):
    """A Client of ``scheduler``, or of an embedded local cluster of worker processes."""
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0") as cluster:
        with Client(cluster) as client:
            yield client


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("file", help="a typed file with 'images' and 'labels' features")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local cluster")
    parser.add_argument("--scheduler", default=None, help="address of a dask scheduler")
    args = parser.parse_args(argv)
    with dask_client(args.scheduler, args.workers) as client:
        print(f"dask dashboard: {client.dashboard_link}")
        stats = class_statistics(h5m.TypedFile(args.file))
    for name, s in stats.items():
        mean = " ".join(f"{v:6.1f}" for v in s["mean"])
        std = " ".join(f"{v:5.1f}" for v in s["std"])
        print(f"{name:>10}  n={s['count']:<5} mean RGB {mean}   std {std}")


if __name__ == "__main__":
    main()
