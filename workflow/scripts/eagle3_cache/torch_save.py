"""Reading a small `torch.save` file without torch, its tensors as numpy arrays: for the jobs that import no torch.

A `torch.save` file is an uncompressed zip. `<archive>/data.pkl` pickles the object, each tensor reduced
to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` and each
storage to a persistent id `("storage", torch.<Type>Storage, key, location, numel)` whose bytes are the
record `<archive>/data/<key>`, little-endian (the `byteorder` record). The unpickler here resolves only
those names, and OrderedDict for the hooks, so it accepts what `torch.load(weights_only=True)` accepts
of plain tensors in plain containers and refuses any other global. The vocabulary selection and the
vocabulary mapping are read this way by the manifest and report jobs.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

# torch's typed storage classes, by the numpy dtype of their elements (little-endian).
STORAGE_DTYPES = {
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
}


def rebuilt_array(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any):
    """The tensor `_rebuild_tensor_v2` would make, as a numpy array of its own."""
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=[step * storage.itemsize for step in stride]
    )
    return view.copy()


class TensorUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` of a `torch.save` archive, its storages read by `record(name)`."""

    def __init__(self, handle, record: Callable[[str], bytes]):
        super().__init__(handle)
        self.record = record

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuilt_array
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not a plain tensor or container")

    def persistent_load(self, pid: Any) -> np.ndarray:
        kind, dtype, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        return np.frombuffer(self.record(f"data/{key}"), dtype=dtype, count=numel)


def load_torch_save(path: str | os.PathLike) -> Any:
    """What `torch.load(path, weights_only=True)` gives, with numpy arrays for tensors.

    Raises OSError, zipfile.BadZipFile or pickle.UnpicklingError for a file that is not one.
    """
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise pickle.UnpicklingError(f"{path}: not a torch.save archive ({len(pickles)} data.pkl records)")
        prefix = pickles[0].removesuffix("data.pkl")
        with archive.open(pickles[0]) as handle:
            return TensorUnpickler(handle, lambda name: archive.read(prefix + name)).load()
