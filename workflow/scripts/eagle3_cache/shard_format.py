"""The on-disk cache format (NeMo Automodel 0.7.0, `format_version` 2): shards and embeddings written and read.

The layout of a shard (fields, sizes, header) is plain arithmetic in `shard_layout`; a cache directory
is checked against its manifest in `cache_dir`.

A cache directory holds `shard-NNNNNN.safetensors` files (contiguous blocks of samples, each
field stacked on dim 0; every shard holds `shard_size` samples except the last),
`target_embeddings.safetensors` and `manifest.json`. Positions where `attention_mask` is 0 hold
zeros in the computed fields (`aux_hidden_states`, `position_mask`, the target distribution):
nothing trains on them, so the target is never run there.

Shards are streamed: the layout of a shard is known before its first batch is computed, so the
safetensors header is written first and each sample's rows go straight to their offsets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from .atomic import atomic_output
from .shard_layout import (
    CACHE_DTYPES,
    EMBEDDINGS_DTYPE,
    EMBEDDINGS_TENSOR,
    ShardLayout,
    safetensors_header,
)
from .sparse_digest import file_digest

SAFETENSORS_DTYPES = {
    torch.int64: "I64",
    torch.int32: "I32",
    torch.bool: "BOOL",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
# The config's `dtype` as a torch dtype.
DTYPES = {name: TORCH_DTYPES[stored] for name, stored in CACHE_DTYPES.items()}


def compress_target_probs(probs: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k `(values, int32 indices)` of a distribution, values renormalized to sum to 1."""
    values, indices = torch.topk(probs, topk, dim=-1)
    values = values / values.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    return values, indices.to(torch.int32)


def reconstruct_target_probs(values: torch.Tensor, indices: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """Scatter stored top-k pairs back to a full `[..., draft_vocab_size]` distribution."""
    full = torch.zeros((*values.shape[:-1], draft_vocab_size), dtype=values.dtype)
    return full.scatter_(-1, indices.to(torch.long), values)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class ShardWriter:
    """Write one shard through `<name>.tmp`, sample rows at a time, in any order.

    The file is sized up front (unwritten bytes read as zeros), each row goes to its offset with
    `os.pwrite`, and `commit()` fsyncs, hashes and renames it into place. If `commit()` is never
    reached the temp file is removed and nothing appears under the final name.
    """

    def __init__(self, path: str | os.PathLike, layout: ShardLayout, num_samples: int):
        self.path = Path(path)
        self.layout = layout
        self.num_samples = num_samples
        self.fields = {field.name: field for field in layout.fields()}
        header, self.offsets = safetensors_header(layout, num_samples)
        self.data_start = len(header)
        self.size = layout.shard_bytes(num_samples)
        self._output = atomic_output(self.path)
        self.tmp = self._output.__enter__()
        self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        os.pwrite(self.fd, header, 0)
        os.ftruncate(self.fd, self.size)

    def write_row(self, sample: int, field: str, values: torch.Tensor) -> None:
        """Write the leading positions of one sample's field; positions after them stay zero."""
        spec = self.fields[field]
        if values.dtype != TORCH_DTYPES[spec.dtype] or tuple(values.shape[1:]) != spec.sample_shape[1:]:
            raise ValueError(f"{field}: got {values.dtype} {tuple(values.shape)}, layout wants {spec}")
        offset = self.data_start + self.offsets[field] + sample * spec.sample_bytes
        os.pwrite(self.fd, tensor_bytes(values), offset)

    def sync(self) -> None:
        """Wait until every byte written is on disk."""
        os.fsync(self.fd)

    def commit(self) -> str:
        """Make the shard durable under its final name; returns its digest (sparse_digest: its padding, left as
        holes, is not read)."""
        self.sync()
        os.close(self.fd)
        digest = file_digest(self.tmp)
        self._output.__exit__(None, None, None)
        return digest

    def abort(self) -> None:
        """Drop the temp file; the final name is never touched."""
        os.close(self.fd)
        self._output.__exit__(RuntimeError, RuntimeError("shard aborted"), None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def read_shard_rows(path: str | os.PathLike, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """Selected samples of one shard, every stored field, as `[len(rows), ...]` tensors."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: torch.stack([handle.get_slice(key)[row] for row in rows]) for key in handle.keys()}


def write_target_embeddings(path: str | os.PathLike, weight: torch.Tensor) -> None:
    """`target_embeddings.safetensors`: key `weight`, `[V, H]` fp32, for seeding the draft."""
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({EMBEDDINGS_TENSOR: weight.to(TORCH_DTYPES[EMBEDDINGS_DTYPE]).contiguous()}, str(tmp))
