"""The few array operations the numeric scan needs, on torch tensors or numpy arrays alike.

A shard job scans its rows as torch tensors on the device that computed them; the verification job
scans the committed file's rows as numpy arrays, so that it imports no torch (seconds of start-up
per job). One scan (`scan.ShardScan`) serves both through these; each is the same operation in
either library (reductions along the last axis). Torch is never imported here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = Any  # a torch.Tensor or a numpy.ndarray


def is_numpy(array: Array) -> bool:
    return isinstance(array, np.ndarray)


def zeros_like(array: Array) -> Array:
    return np.zeros_like(array) if is_numpy(array) else array.new_zeros(array.shape)


def ones_like(array: Array) -> Array:
    return np.ones_like(array) if is_numpy(array) else array.new_ones(array.shape)


def shifted_left(array: Array) -> Array:
    """Shift a `[n, S]` array left by one along the sequence, with 0 in the last slot."""
    shifted = zeros_like(array)
    shifted[:, :-1] = array[:, 1:]
    return shifted


def is_bool(array: Array) -> bool:
    return array.dtype == np.bool_ if is_numpy(array) else str(array.dtype) == "torch.bool"


def as_bool(array: Array) -> Array:
    return array.astype(bool) if is_numpy(array) else array.bool()


def index_like(values: list[int] | range, like: Array) -> Array:
    """`values` as an index array of `like`'s library (on the CPU)."""
    if is_numpy(like):
        return np.asarray(values, dtype=np.int64)
    import torch

    return torch.as_tensor(list(values), dtype=torch.long)


def on_device_of(array: Array, like: Array) -> Array:
    """`array` where `like` is (numpy arrays are always on the host)."""
    return array if is_numpy(array) else array.to(like.device)


def to_host(array: Array) -> Array:
    return array if is_numpy(array) else array.cpu()


def any_last(array: Array) -> Array:
    return array.any(axis=-1) if is_numpy(array) else array.any(dim=-1)


def all_last(array: Array) -> Array:
    return array.all(axis=-1) if is_numpy(array) else array.all(dim=-1)


def max_last(array: Array) -> Array:
    return array.max(axis=-1) if is_numpy(array) else array.amax(dim=-1)


def min_last(array: Array) -> Array:
    return array.min(axis=-1) if is_numpy(array) else array.amin(dim=-1)


def float32_sum_last(array: Array) -> Array:
    if is_numpy(array):
        return array.sum(axis=-1, dtype=np.float32)
    import torch

    return array.sum(dim=-1, dtype=torch.float32)


def sort_last(array: Array) -> Array:
    return np.sort(array, axis=-1) if is_numpy(array) else array.sort(dim=-1).values


def diff_last(array: Array) -> Array:
    return np.diff(array, axis=-1) if is_numpy(array) else array.diff(dim=-1)


def is_floating(array: Array) -> bool:
    return np.issubdtype(array.dtype, np.floating) if is_numpy(array) else array.is_floating_point()


def isfinite(array: Array) -> Array:
    if is_numpy(array):
        return np.isfinite(array)
    import torch

    return torch.isfinite(array)


def as_uint8(array: Array) -> Array:
    if is_numpy(array):
        return array.astype(np.uint8)
    import torch

    return array.to(torch.uint8)


def worst(array: Array) -> float:
    """The largest value, NaN counted as infinity."""
    if is_numpy(array):
        return float(np.nan_to_num(array, nan=np.inf).max())
    return float(array.nan_to_num(float("inf")).max())
