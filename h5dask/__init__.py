"""h5dask: typed HDF5 files built in parallel with dask.

Declare a type of file as a class of features, build it from many sources,
read it by id or like h5py, analyse it with dask and serve it to PyTorch.
"""

from . import errors, features
from .errors import H5DaskError
from .feature import Array, Feature, Group, String
from .proxy import DatasetProxy, GroupProxy, Proxy
from .serve import AsFramedSlice, AsSlice, GetId, Getter, Input, Target
from .typed_file import Failure, TypedFile

__version__ = "0.1.0"

__all__ = [
    "Array",
    "AsFramedSlice",
    "AsSlice",
    "DatasetProxy",
    "Failure",
    "Feature",
    "GetId",
    "Getter",
    "Group",
    "GroupProxy",
    "H5DaskError",
    "Input",
    "Proxy",
    "String",
    "Target",
    "TypedFile",
    "errors",
    "features",
]
