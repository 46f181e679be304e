"""The on-disk cache format (NeMo Automodel 0.7.0, `format_version` 2), written and checked here only.

The layout of a shard (fields, sizes, header) is plain arithmetic in `shard_layout`.

A cache directory holds `shard-NNNNNN.safetensors` files (contiguous blocks of samples, each
field stacked on dim 0; every shard holds `shard_size` samples except the last),
`target_embeddings.safetensors` and `manifest.json`. Positions where `attention_mask` is 0 hold
zeros in the computed fields (`aux_hidden_states`, `position_mask`, the target distribution):
nothing trains on them, so the target is never run there.

Shards are streamed: the layout of a shard is known before its first batch is computed, so the
safetensors header is written first and each sample's rows go straight to their offsets.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .atomic import atomic_output, temp_path_for
from .layout import EMBEDDINGS_FILE, MANIFEST_FILE, SHARD_NAME, num_shards, samples_in_shard, shard_file_name
from .shard_layout import (
    CACHE_DTYPES,
    EMBEDDINGS_DTYPE,
    EMBEDDINGS_TENSOR,
    ShardLayout,
    safetensors_header,
    stored_safetensors_header,
)

FORMAT_VERSION = 2
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
# The fields NeMo Automodel's manifest carries; ours adds provenance and integrity on top.
AUTOMODEL_MANIFEST_KEYS = (
    "format_version",
    "target_model",
    "target_vocab_size",
    "draft_vocab_size",
    "seq_length",
    "dtype",
    "num_samples",
    "shard_size",
    "target_probs_topk",
    "aux_hidden_dim",
    "aux_layer_ids",
    "selected_token_ids",
    "input_data",
    "split",
    "shuffle_seed",
    "mask_reasoning_content",
    "mask_generation_prompt",
)
HASH_CHUNK_BYTES = 16 << 20


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

    def commit(self) -> str:
        """Make the shard durable under its final name; returns its sha256."""
        os.fsync(self.fd)
        os.close(self.fd)
        digest = file_sha256(self.tmp)
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


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_shard_rows(path: str | os.PathLike, rows: Sequence[int]) -> dict[str, torch.Tensor]:
    """Selected samples of one shard, every stored field, as `[len(rows), ...]` tensors."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: torch.stack([handle.get_slice(key)[row] for row in rows]) for key in handle.keys()}


def shard_indices_in(cache_dir: str | os.PathLike) -> list[int]:
    """The shard indices present in a directory, sorted."""
    return sorted(int(m.group(1)) for name in os.listdir(cache_dir) if (m := SHARD_NAME.match(name)))


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a cache directory."""
    with open(Path(cache_dir) / MANIFEST_FILE) as handle:
        return json.load(handle)


def write_target_embeddings(path: str | os.PathLike, weight: torch.Tensor) -> None:
    """`target_embeddings.safetensors`: key `weight`, `[V, H]` fp32, for seeding the draft."""
    from safetensors.torch import save_file

    with atomic_output(path) as tmp:
        save_file({EMBEDDINGS_TENSOR: weight.to(TORCH_DTYPES[EMBEDDINGS_DTYPE]).contiguous()}, str(tmp))


@dataclass(frozen=True)
class CacheProblem:
    """One way a cache directory differs from what its manifest promises."""

    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}"


def manifest_problems(manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """Missing Automodel fields or a wrong format version."""
    problems = [
        CacheProblem(MANIFEST_FILE, f"missing field {key!r}") for key in AUTOMODEL_MANIFEST_KEYS if key not in manifest
    ]
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(
            CacheProblem(MANIFEST_FILE, f"format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
        )
    return problems


def shard_set_problems(cache_dir: Path, manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """Shards not exactly `0..N-1`, and stray or temporary files."""
    expected = set(range(num_shards(int(manifest["num_samples"]), int(manifest["shard_size"]))))
    present = set(shard_indices_in(cache_dir))
    problems = [CacheProblem(shard_file_name(i), "missing") for i in sorted(expected - present)]
    problems += [CacheProblem(shard_file_name(i), "not in the manifest (stale?)") for i in sorted(present - expected)]
    known = {shard_file_name(i) for i in present} | {MANIFEST_FILE, EMBEDDINGS_FILE}
    problems += [CacheProblem(name, "stray or temporary file") for name in sorted(set(os.listdir(cache_dir)) - known)]
    if EMBEDDINGS_FILE not in os.listdir(cache_dir):
        problems.append(CacheProblem(EMBEDDINGS_FILE, "missing"))
    return problems


def shard_layout_problems(path: Path, layout: ShardLayout, num_samples: int) -> list[CacheProblem]:
    """Keys, shapes and dtypes of one shard against the layout."""
    want = {f.name: ([num_samples, *f.sample_shape], f.dtype) for f in layout.fields()}
    try:
        got = {name: (entry["shape"], entry["dtype"]) for name, entry in safetensors_entries(path).items()}
    # A damaged header may be cut short, not JSON, or JSON without the entries' keys.
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as error:
        return [CacheProblem(path.name, f"unreadable safetensors header: {error!r}")]
    diffs = [
        f"{key}: stored {got.get(key)}, expected {want.get(key)}"
        for key in sorted(want.keys() | got.keys())
        if got.get(key) != want.get(key)
    ]
    return [CacheProblem(path.name, "; ".join(diffs))] if diffs else []


def safetensors_entries(path: Path) -> dict[str, Any]:
    """The tensor entries of a safetensors header, without reading the data."""
    entries = json.loads(stored_safetensors_header(path))
    entries.pop("__metadata__", None)
    return entries


def shard_size_problems(cache_dir: Path, manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """Each present shard's byte size against the manifest's record of it (from the directory, opening no shard)."""
    problems = []
    for record in manifest.get("shards", []):
        path = cache_dir / record["file"]
        if path.exists() and path.stat().st_size != record["bytes"]:
            problems.append(CacheProblem(path.name, f"{path.stat().st_size} bytes, manifest says {record['bytes']}"))
    return problems


def shard_content_problems(cache_dir: Path, manifest: Mapping[str, Any], verify_hashes: bool) -> list[CacheProblem]:
    """Each present shard's keys, shapes, dtypes and sha256 against its layout and the manifest's record."""
    problems = []
    layout = ShardLayout.from_manifest(manifest)
    for record in manifest.get("shards", []):
        path = cache_dir / record["file"]
        if not path.exists():
            continue
        problems += shard_layout_problems(path, layout, int(record["num_samples"]))
        if verify_hashes and file_sha256(path) != record["sha256"]:
            problems.append(CacheProblem(path.name, "sha256 differs from the manifest (corrupted or replaced)"))
    return problems


def shard_records_problems(manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """The manifest's shard records must cover every sample, in order."""
    records = manifest.get("shards")
    if records is None:
        return [CacheProblem(MANIFEST_FILE, "no per-shard records (not written by eagle3-cache?)")]
    n, size = int(manifest["num_samples"]), int(manifest["shard_size"])
    expected = [(shard_file_name(i), samples_in_shard(i, n, size)) for i in range(num_shards(n, size))]
    if [(r["file"], r["num_samples"]) for r in records] != expected:
        return [CacheProblem(MANIFEST_FILE, "shard records do not match num_samples and shard_size")]
    return []


def readable_manifest(cache_dir: Path) -> dict[str, Any] | CacheProblem:
    """The manifest of a cache directory, or why there is none to check it against."""
    if not (cache_dir / MANIFEST_FILE).exists():
        return CacheProblem(MANIFEST_FILE, "missing: the cache is incomplete or retired (the manifest is written last)")
    try:
        return read_manifest(cache_dir)
    except json.JSONDecodeError as error:
        return CacheProblem(MANIFEST_FILE, f"not valid JSON: {error}")


def committed_manifest(cache_dir: Path) -> tuple[dict[str, Any] | None, list[CacheProblem]]:
    """The manifest of a cache directory and, when it is missing or unusable, why."""
    manifest = readable_manifest(cache_dir)
    if isinstance(manifest, CacheProblem):
        return None, [manifest]
    problems = manifest_problems(manifest)
    return (None if problems else manifest), problems


def directory_problems(cache_dir: Path, manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """What the directory listing shows against the manifest: records, the shard set, sizes (no shard is opened)."""
    return (
        shard_records_problems(manifest)
        + shard_set_problems(cache_dir, manifest)
        + shard_size_problems(cache_dir, manifest)
    )


def check_cache(cache_dir: str | os.PathLike, verify_hashes: bool = True) -> list[CacheProblem]:
    """Everything wrong with a cache directory, each shard read; empty when it is complete and intact."""
    cache_dir = Path(cache_dir)
    manifest, problems = committed_manifest(cache_dir)
    if manifest is None:
        return problems
    return directory_problems(cache_dir, manifest) + shard_content_problems(cache_dir, manifest, verify_hashes)


def leftover_temp_files(cache_dir: str | os.PathLike) -> list[Path]:
    """Temp files a killed writer left behind."""
    suffix = temp_path_for("x").suffix
    return sorted(p for p in Path(cache_dir).iterdir() if p.suffix == suffix)
