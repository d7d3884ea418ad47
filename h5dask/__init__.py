"""h5dask: typed HDF5 files built in parallel with dask."""

from . import errors
from .errors import H5DaskError
from .feature import Array, Feature, Group, String

__version__ = "0.1.0"

__all__ = ["Array", "Feature", "Group", "H5DaskError", "String", "errors"]
