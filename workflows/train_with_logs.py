"""Train a small PyTorch model from a typed file, logging into another typed file.

Reads an image dataset (``images`` and ``labels`` features, as ``build_dataset.py``
writes; by default one is built from the demo's sample photographs), serves it
to a DataLoader of worker processes with ``file.serve(...)``, trains a small
classifier, and after each epoch adds the batch losses, the accuracy and a
checkpoint of the model to ``run.h5``. Then it reads them back, reports them,
and restores the best epoch's checkpoint.

Example::

    python workflows/train_with_logs.py --dir /tmp/run --epochs 3 --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import h5dask as h5m  # noqa: E402
from h5dask.features import TensorDict  # noqa: E402


class Run(h5m.TypedFile):
    """What one training run writes: logs by epoch, and a checkpoint by epoch."""

    logs = h5m.Group(loss=h5m.Array(), accuracy=h5m.Array())
    checkpoints = TensorDict()


class Classifier(torch.nn.Module):
    """Average-pool the image to 8x8, then one linear layer."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.reshape(-1, *images.shape[-3:]).permute(0, 3, 1, 2).float() / 255
        x = torch.nn.functional.adaptive_avg_pool2d(x, 8)
        return self.linear(x.flatten(1))


def loader(data: h5m.TypedFile, workers: int, shuffle: bool) -> torch.utils.data.DataLoader:
    """Batches of ``x`` (images) and ``y`` (labels), one item per id."""
    batch = dict(
        x=h5m.Input(key="images", getter=h5m.GetId()),
        y=h5m.Target(key="labels", getter=h5m.GetId()),
    )
    return data.serve(batch, batch_size=32, shuffle=shuffle, num_workers=workers)


def accuracy(model: torch.nn.Module, batches: torch.utils.data.DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        hits = [(model(b["x"]).argmax(1) == b["y"].view(-1)).float() for b in batches]
    model.train()
    return float(torch.cat(hits).mean())


def train(data: h5m.TypedFile, run: Run, epochs: int, workers: int) -> Classifier:
    """Train, adding each epoch's losses, accuracy and checkpoint to ``run``."""
    model = Classifier(len(data.labels.attrs["vocabulary"]))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    train_batches, eval_batches = loader(data, workers, True), loader(data, workers, False)
    for epoch in range(epochs):
        losses = []
        for b in train_batches:
            loss = torch.nn.functional.cross_entropy(model(b["x"]), b["y"].view(-1))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        acc = accuracy(model, eval_batches)
        run.logs.add(f"epoch-{epoch}", {"loss": np.array(losses), "accuracy": acc})
        run.checkpoints.add(f"epoch-{epoch}", TensorDict.format(model.state_dict()))
        print(f"epoch {epoch}: mean loss {np.mean(losses):.3f}, accuracy {acc:.3f}")
    return model


def report(run: Run, data: h5m.TypedFile, workers: int) -> str:
    """Print what ``run`` holds, restore the best checkpoint; return the best epoch's id."""
    accuracies = {id: float(run.logs.accuracy.get(id)[0]) for id in run.logs.accuracy.ids}
    for id, acc in accuracies.items():
        print(f"{id}: {len(run.logs.loss.get(id))} batches, accuracy {acc:.3f}")
    best = max(accuracies, key=accuracies.get)
    model = Classifier(len(data.labels.attrs["vocabulary"]))
    model.load_state_dict(run.checkpoints.get(best))  # read back as torch tensors
    restored = accuracy(model, loader(data, workers, False))
    print(f"best: {best}; its checkpoint restored scores {restored:.3f}")
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    parser.add_argument("--data", default=None, help="an image dataset (default: build one)")
    parser.add_argument("--dir", default="train-output", help="where to write run.h5")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    if args.data is None:
        from build_dataset import build
        from samples import write_samples

        write_samples(os.path.join(args.dir, "images"), per_class=20)
        args.data = os.path.join(args.dir, "data.h5")
        build(os.path.join(args.dir, "images"), args.data, scheduler="threads", progress=False)
    data = h5m.TypedFile(args.data)
    with Run(os.path.join(args.dir, "run.h5"), mode="w") as run:
        train(data, run, args.epochs, args.workers)
        report(run, data, args.workers)


if __name__ == "__main__":
    main()
