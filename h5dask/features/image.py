"""Images decoded with Pillow."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..feature import Feature
from ._common import open_seekable, require

__all__ = ["Image"]

IMAGE_PATTERN = r"(?i)\.(png|jpe?g|bmp|gif|tiff?|webp)$"
RESAMPLE_METHODS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")


def _pil_image() -> Any:
    return require("PIL.Image", "Pillow", "images", "h5dask.features.Image")


def _normalize_size(size: int | tuple[int, int] | list[int] | None) -> list[int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        size = (size, size)
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"Image size must be positive, got {size!r}")
    return [width, height]


def _item_ndim(mode: str) -> int:
    """2 for single-band modes ("L", "1", "I;16"...), 3 for the others."""
    return 2 if len(mode) == 1 or mode.startswith("I;") else 3


class Image(Feature):
    """An image file decoded with Pillow, one item per source.

    ``load`` returns an array of shape ``(1, H, W, C)`` for multi-band modes
    (``"RGB"``, ``"RGBA"``, ``"LA"``...) and ``(1, H, W)`` for single-band modes
    (``"L"``, ``"1"``, ``"I"``, ``"F"``), so that row ``i`` of the dataset is the
    ``i``-th image. The dtype is the one Pillow gives for the mode (``uint8``
    for ``"RGB"`` and ``"L"``). Animated files give their first frame.
    Local paths and fsspec URLs are read alike.

    Parameters
    ----------
    size : int or (int, int), optional
        Resize every image to ``(size, size)`` or ``(width, height)``; by
        default images keep their size, and then must all share it to be
        concatenated.
    mode : str
        Pillow mode every image is converted to.
    pattern : str, optional
        Regular expression for ``__re__``; by default common image extensions.
    resample : str
        Pillow resampling filter used by the resize: one of ``"nearest"``,
        ``"box"``, ``"bilinear"``, ``"hamming"``, ``"bicubic"``, ``"lanczos"``.
    **ds_kwargs
        Keyword arguments of :meth:`h5py.Group.create_dataset`, e.g.
        ``compression="lzf"``. No compression by default.

    Notes
    -----
    Needs Pillow (``pip install h5dask[images]``); an ``ImportError`` saying so
    is raised by :meth:`load` when it is missing. :meth:`plot` needs matplotlib.

    Examples
    --------
    >>> import h5dask as h5m
    >>> feature = h5m.features.Image(size=64, mode="L", compression="lzf")
    >>> feature.attrs
    {'mode': 'L', 'size': [64, 64], 'resample': 'bicubic'}
    """

    __re__ = IMAGE_PATTERN

    def __init__(
        self,
        size: int | tuple[int, int] | None = None,
        mode: str = "RGB",
        pattern: str | None = None,
        resample: str = "bicubic",
        **ds_kwargs: Any,
    ):
        if resample not in RESAMPLE_METHODS:
            raise ValueError(f"resample must be one of {RESAMPLE_METHODS}, got {resample!r}")
        self.size = _normalize_size(size)
        self.mode = mode
        self.resample = resample
        if pattern is not None:
            self.__re__ = pattern
        self.__ds_kwargs__ = dict(ds_kwargs)

    @property
    def attrs(self) -> dict[str, Any]:
        return {"mode": self.mode, "size": self.size, "resample": self.resample}

    def load(self, source: str) -> np.ndarray:
        """Decode ``source``, convert it to :attr:`mode`, resize it; shape ``(1, H, W[, C])``."""
        pil = _pil_image()
        with open_seekable(source) as f, pil.open(f) as img:
            img = img.convert(self.mode)
        if self.size is not None:
            method = pil.Resampling[self.resample.upper()]
            img = img.resize(tuple(self.size), resample=method)
        return np.asarray(img)[None]

    def plot(self, data: Any, ncols: int = 8, **imshow_kwargs: Any) -> Any:
        """Show one image or a batch of images in a grid; return the matplotlib Figure.

        Parameters
        ----------
        data : array_like
            One image ``(H, W[, C])`` or a batch ``(N, H, W[, C])``, as read
            from the file.
        ncols : int
            Maximum number of images per row.
        **imshow_kwargs
            Passed to :meth:`matplotlib.axes.Axes.imshow`.
        """
        plt = require("matplotlib.pyplot", "matplotlib", "matplotlib", "Image.plot")
        arr = np.asarray(data)
        ndim = _item_ndim(self.mode)
        images = arr.reshape(-1, *arr.shape[arr.ndim - ndim :])
        ncols = max(1, min(ncols, len(images)))
        nrows = -(-len(images) // ncols)
        fig, axes = plt.subplots(nrows, ncols, squeeze=False, figsize=(2 * ncols, 2 * nrows))
        if ndim == 2:
            imshow_kwargs.setdefault("cmap", "gray")
        for ax, image in zip(axes.flat, images, strict=False):
            ax.imshow(image, **imshow_kwargs)
        for ax in axes.flat:
            ax.axis("off")
        return fig
