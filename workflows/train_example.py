"""Train a tiny PyTorch model from a typed file with ``serve()``, logging into another.

Builds ``data.h5`` from numpy arrays (one id per sample: a noisy 2-D point and
its class), serves it with ``file.serve(...)`` to a DataLoader of worker
processes, trains a small classifier and logs each epoch's loss with
``logs.add(...)`` into ``logs.h5``.

Example::

    python workflows/train_example.py --dir /tmp/run --epochs 3 --workers 2
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

import h5dask as h5m


class Points(h5m.TypedFile):
    point = h5m.Array()
    label = h5m.Array()


class Logs(h5m.TypedFile):
    loss = h5m.Array()


def build(path: str, n: int, seed: int = 0) -> Points:
    """``n`` points around two centres, one id each."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    points = (rng.normal(size=(n, 2)) + np.where(labels[:, None], 2.0, -2.0)).astype("f4")
    with Points(path, mode="w") as file:
        for i in range(n):
            file.add(f"point-{i}", {"point": points[i : i + 1], "label": labels[i : i + 1]})
    return Points(path)


def train(data: Points, logs: Logs, epochs: int, workers: int) -> list[float]:
    """Fit a linear classifier; log the mean loss of each epoch as id ``epoch-<k>``."""
    loader = data.serve(
        dict(
            x=h5m.Input(key="point", getter=h5m.GetId()),
            y=h5m.Target(key="label", getter=h5m.GetId()),
        ),
        batch_size=64,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    model = torch.nn.Linear(2, 2)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for epoch in range(epochs):
        total, count = 0.0, 0
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(model(batch["x"][:, 0]), batch["y"][:, 0])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, count = total + loss.item() * len(batch["y"]), count + len(batch["y"])
        losses.append(total / count)
        logs.add(f"epoch-{epoch}", {"loss": np.array([losses[-1]])})
        print(f"epoch {epoch}: loss {losses[-1]:.4f}")
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".", help="where to write data.h5 and logs.h5")
    parser.add_argument("--samples", type=int, default=2000, help="points in data.h5")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    data = build(os.path.join(args.dir, "data.h5"), args.samples)
    with Logs(os.path.join(args.dir, "logs.h5"), mode="w") as logs:
        train(data, logs, args.epochs, args.workers)
        print(f"logged {len(logs.ids)} epochs: {logs.loss[:].round(4).tolist()}")


if __name__ == "__main__":
    main()
