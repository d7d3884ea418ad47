"""Audio files decoded with soundfile."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..feature import Feature
from ._common import open_seekable, require

__all__ = ["Sound", "resample_linear"]

SOUND_PATTERN = r"(?i)\.(wav|flac|ogg|oga|aiff?|au|mp3)$"


def resample_linear(samples: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample along axis 0 by linear interpolation between neighbouring samples.

    The output has ``round(n * sr_out / sr_in)`` frames; output frame ``i``
    is the input signal at time ``i / sr_out``. There is no anti-aliasing
    filter: downsampling folds frequencies above ``sr_out / 2`` back into the
    signal. Resample beforehand with a dedicated library when that matters.
    """
    if sr_in == sr_out:
        return samples
    n_out = int(round(samples.shape[0] * sr_out / sr_in))
    positions = np.arange(n_out) * (sr_in / sr_out)
    grid = np.arange(samples.shape[0])
    columns = samples.reshape(samples.shape[0], -1).T
    out = np.stack([np.interp(positions, grid, column) for column in columns], axis=1)
    return out.reshape(n_out, *samples.shape[1:]).astype(samples.dtype, copy=False)


class Sound(Feature):
    """An audio file decoded with soundfile, as ``float32`` samples in [-1, 1].

    Rows are time frames: ``load`` returns shape ``(n_frames,)`` when ``mono``
    (channels averaged), otherwise ``(n_frames, n_channels)``, so a source's
    region of the dataset is its duration. Local paths and fsspec URLs are
    read alike; every format of libsndfile works (WAV, FLAC, OGG, MP3...).

    Parameters
    ----------
    sr : int, optional
        Sample rate of the stored signals. A file at another rate is resampled
        by linear interpolation (:func:`resample_linear`: simple and exact at
        the original sample times, but without anti-aliasing filter). By
        default files keep their own rate, which is then not recorded.
    mono : bool
        Average the channels into one.
    pattern : str, optional
        Regular expression for ``__re__``; by default common audio extensions.
    **ds_kwargs
        Keyword arguments of :meth:`h5py.Group.create_dataset`.

    Notes
    -----
    Needs soundfile (``pip install h5dask[sound]``); an ``ImportError`` saying
    so is raised by :meth:`load` when it is missing. With ``mono=False``, all
    files must have the same number of channels to be concatenated.

    Examples
    --------
    >>> import h5dask as h5m
    >>> h5m.features.Sound(sr=16000).attrs
    {'sr': 16000, 'mono': True}
    """

    __re__ = SOUND_PATTERN

    def __init__(
        self,
        sr: int | None = None,
        mono: bool = True,
        pattern: str | None = None,
        **ds_kwargs: Any,
    ):
        if sr is not None and int(sr) <= 0:
            raise ValueError(f"sr must be a positive sample rate, got {sr!r}")
        self.sr = None if sr is None else int(sr)
        self.mono = bool(mono)
        if pattern is not None:
            self.__re__ = pattern
        self.__ds_kwargs__ = {"dtype": "float32", **ds_kwargs}

    @property
    def attrs(self) -> dict[str, Any]:
        return {"sr": self.sr, "mono": self.mono}

    def load(self, source: str) -> np.ndarray:
        """Decode ``source``; shape ``(n_frames,)`` if mono, else ``(n_frames, n_channels)``."""
        sf = require("soundfile", "soundfile", "sound", "h5dask.features.Sound")
        with open_seekable(source) as f:
            samples, rate = sf.read(f, dtype="float32", always_2d=True)
        if self.mono:
            samples = samples.mean(axis=1, dtype=np.float32)
        if self.sr is not None:
            samples = resample_linear(samples, rate, self.sr)
        return np.ascontiguousarray(samples, dtype=np.float32)
