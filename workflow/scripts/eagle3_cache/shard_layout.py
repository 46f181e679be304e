"""The layout of a shard file as plain arithmetic: its fields, their sizes, its safetensors header. No torch.

`shard_format` writes and reads shards in this layout; the disk plan sizes them with it before
any shard is written, so both read the layout from here.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The fields rebuilt from the token store. The shard writer writes them over the full seq_length;
# the fields the target computes it writes only over each sample's content positions.
TOKEN_FIELDS = ("input_ids", "attention_mask", "loss_mask")
# EAGLE-3 reads three aux layers; their outputs are concatenated.
NUM_AUX_LAYERS = 3
# Bytes per element of each safetensors dtype a cache stores.
ELEMENT_BYTES = {"I64": 8, "I32": 4, "BOOL": 1, "BF16": 2, "F16": 2, "F32": 4}
# The config's `dtype` as a safetensors dtype.
CACHE_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
# Their machine epsilon (torch.finfo(dtype).eps), for the scan's tolerance.
CACHE_DTYPE_EPS = {"bf16": 2.0**-7, "fp16": 2.0**-10, "fp32": 2.0**-23}
# `target_embeddings.safetensors`: one `[V, H]` tensor under this key, in this dtype.
EMBEDDINGS_TENSOR = "weight"
EMBEDDINGS_DTYPE = "F32"


def is_topk(target_probs_topk: int | None, draft_vocab_size: int) -> bool:
    """True when top-k actually compresses: a positive k below the draft vocab width."""
    return target_probs_topk is not None and 0 < int(target_probs_topk) < draft_vocab_size


@dataclass(frozen=True)
class FieldSpec:
    """One shard field: its per-sample shape (positions first) and its safetensors dtype."""

    name: str
    sample_shape: tuple[int, ...]
    dtype: str

    @property
    def sample_bytes(self) -> int:
        return math.prod(self.sample_shape) * ELEMENT_BYTES[self.dtype]

    @property
    def position_bytes(self) -> int:
        return self.sample_bytes // self.sample_shape[0]


@dataclass(frozen=True)
class ShardLayout:
    """The fields of every shard of one cache."""

    seq_length: int
    aux_hidden_dim: int
    draft_vocab_size: int
    dtype: str
    target_probs_topk: int

    def fields(self) -> list[FieldSpec]:
        s, cache_dtype = self.seq_length, CACHE_DTYPES[self.dtype]
        fields = [FieldSpec(name, (s,), "I64") for name in TOKEN_FIELDS]
        fields += [
            FieldSpec("aux_hidden_states", (s, self.aux_hidden_dim), cache_dtype),
            FieldSpec("position_mask", (s, 1), "BOOL"),
        ]
        if is_topk(self.target_probs_topk, self.draft_vocab_size):
            k = self.target_probs_topk
            fields += [
                FieldSpec("target_probs_values", (s, k), cache_dtype),
                FieldSpec("target_probs_indices", (s, k), "I32"),
            ]
        else:
            fields.append(FieldSpec("target_probs", (s, self.draft_vocab_size), cache_dtype))
        return fields

    def shard_bytes(self, num_samples: int) -> int:
        """A shard's size: header plus every field's bytes."""
        header, _ = safetensors_header(self, num_samples)
        return len(header) + num_samples * sum(f.sample_bytes for f in self.fields())

    @classmethod
    def for_target(
        cls, seq_length: int, hidden_size: int, draft_vocab_size: int, dtype: str, target_probs_topk: int
    ) -> ShardLayout:
        """The layout for a target whose decoder layers are `hidden_size` wide."""
        return cls(seq_length, NUM_AUX_LAYERS * hidden_size, draft_vocab_size, dtype, target_probs_topk)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ShardLayout:
        return cls(
            seq_length=int(manifest["seq_length"]),
            aux_hidden_dim=int(manifest["aux_hidden_dim"]),
            draft_vocab_size=int(manifest["draft_vocab_size"]),
            dtype=manifest["dtype"],
            target_probs_topk=int(manifest["target_probs_topk"] or 0),
        )


def safetensors_header(layout: ShardLayout, num_samples: int) -> tuple[bytes, dict[str, int]]:
    """The length-prefixed safetensors header for a shard, and each field's data offset."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    cursor = 0
    for field in layout.fields():
        size = field.sample_bytes * num_samples
        entries[field.name] = {
            "dtype": field.dtype,
            "shape": [num_samples, *field.sample_shape],
            "data_offsets": [cursor, cursor + size],
        }
        offsets[field.name] = cursor
        cursor += size
    return encoded_header(entries), offsets


def embeddings_header(vocab_size: int, hidden_size: int) -> bytes:
    """The length-prefixed header `safetensors.torch.save_file` writes for the `[V, H]` embeddings."""
    size = vocab_size * hidden_size * ELEMENT_BYTES[EMBEDDINGS_DTYPE]
    entry = {"dtype": EMBEDDINGS_DTYPE, "shape": [vocab_size, hidden_size], "data_offsets": [0, size]}
    return encoded_header({EMBEDDINGS_TENSOR: entry})


def embeddings_bytes(vocab_size: int, hidden_size: int) -> int:
    """The size of `target_embeddings.safetensors`: its header and the `[V, H]` table."""
    return len(embeddings_header(vocab_size, hidden_size)) + vocab_size * hidden_size * ELEMENT_BYTES[EMBEDDINGS_DTYPE]


def encoded_header(entries: Mapping[str, Any]) -> bytes:
    """Compact JSON, space-padded to a multiple of 8 bytes, after its little-endian u64 length."""
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def stored_safetensors_header(path: str | os.PathLike) -> bytes:
    """The JSON header bytes of a safetensors file (names, dtypes, shapes, offsets), without reading the data."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return handle.read(length)
