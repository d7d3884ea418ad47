"""Write a small labelled image collection made of real photographs.

The photographs are scikit-image's sample images (public domain or CC0; see
``skimage/data/README.txt`` of scikit-image and docs/CREDITS.md). Each class
is one photograph; each sample a random 64x64 tile of it, saved as a PNG in
``OUT/<class>/<n>.png``, the layout that ``DirLabels`` turns into labels.

Usage: ``python workflows/samples.py OUT [--per-class N]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

CLASSES = ("brick", "grass", "gravel", "coffee", "chelsea", "rocket")
TILE = 64


def _photo(name: str) -> np.ndarray:
    from skimage import color, data

    image = getattr(data, name)()
    return color.gray2rgb(image) if image.ndim == 2 else image[..., :3]


def write_samples(out: str | Path, per_class: int = 40, seed: int = 0) -> list[Path]:
    """Write ``per_class`` random tiles of each photograph; return the class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folders = []
    for name in CLASSES:
        photo = _photo(name)
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            y = rng.integers(0, photo.shape[0] - TILE)
            x = rng.integers(0, photo.shape[1] - TILE)
            Image.fromarray(photo[y : y + TILE, x : x + TILE]).save(folder / f"{n:04d}.png")
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the class folders into")
    parser.add_argument("--per-class", type=int, default=40, help="tiles per class (default 40)")
    args = parser.parse_args(argv)
    folders = write_samples(args.out, args.per_class)
    print(f"wrote {args.per_class} tiles in each of {len(folders)} classes under {args.out}")


if __name__ == "__main__":
    main()
