"""Built-in features: images, labels, sounds, numpy files, text, bytes, checkpoints.

Each reads local paths and fsspec URLs alike (through :func:`h5dask.sources.open_source`)
and records its extraction parameters in ``attrs``. Heavy libraries are optional
extras imported only when a feature is used: Pillow (``pip install h5dask[images]``)
for :class:`Image`, soundfile (``h5dask[sound]``) for :class:`Sound`, torch
(``h5dask[torch]``) for :class:`TensorDict`; matplotlib for :meth:`Image.plot`.

Shapes returned by ``load`` (axis 0 is the concatenation axis):

=============  ===============================================  ==================
feature        one source gives                                 rows are
=============  ===============================================  ==================
Image          ``(1, H, W, C)``, or ``(1, H, W)`` for "L", "1"  images
DirLabels      ``(1,)`` int64                                   labels
Text           ``(1,)`` object (str)                            texts
Bytes          ``(n_bytes,)`` uint8                             bytes
Sound          ``(n_frames,)`` mono, ``(n_frames, n_channels)``  time frames
Npy            the saved array (at least 1-D); ``.npz``: dict   the array's rows
TensorDict     nested dict of arrays (at least 1-D)             the tensors' rows
VShape         ``{"arr": (size,), "shape_": (ndim,)}``          flat values
=============  ===============================================  ==================

Examples
--------
>>> import h5dask as h5m
>>> schema = dict(images=h5m.features.Image(size=64), labels=h5m.features.DirLabels())
"""

from .arrays import Bytes, Npy, Text, VShape
from .checkpoint import TensorDict
from .image import Image
from .labels import DirLabels
from .sound import Sound

__all__ = ["Bytes", "DirLabels", "Image", "Npy", "Sound", "TensorDict", "Text", "VShape"]
