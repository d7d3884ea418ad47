"""h5dask: typed HDF5 files built in parallel with dask.

Declare a type of file as a class of features, build it from many sources,
read it by id or like h5py, analyse it with dask and serve it to PyTorch.
Every public name of h5mapper 0.3.3 is here too (see docs/h5mapper.md).
"""

from . import errors, features
from .compat import (
    NP_KEY,
    REF_KEY,
    SRC_KEY,
    FileWalker,
    Setter,
    apply_and_store,
    as_temp,
    depth_first_apply,
    flatten_dict,
    for_each,
    in_mem,
    null_regref,
    process_batch,
    tqdm,
    typedfile,
)
from .errors import H5DaskError
from .feature import Array, Feature, Group, String
from .features import TensorDict, VShape
from .proxy import DatasetProxy, GroupProxy, Proxy
from .serve import (
    AsFramedSlice,
    AsSlice,
    GetId,
    Getter,
    Input,
    ProgrammableDataset,
    Target,
)
from .typed_file import Failure, TypedFile

__version__ = "0.1.0"

__all__ = [
    "NP_KEY",
    "REF_KEY",
    "SRC_KEY",
    "Array",
    "AsFramedSlice",
    "AsSlice",
    "DatasetProxy",
    "Failure",
    "Feature",
    "FileWalker",
    "GetId",
    "Getter",
    "Group",
    "GroupProxy",
    "H5DaskError",
    "Input",
    "ProgrammableDataset",
    "Proxy",
    "Setter",
    "String",
    "Target",
    "TensorDict",
    "TypedFile",
    "VShape",
    "apply_and_store",
    "as_temp",
    "depth_first_apply",
    "errors",
    "features",
    "flatten_dict",
    "for_each",
    "in_mem",
    "null_regref",
    "process_batch",
    "tqdm",
    "typedfile",
]
