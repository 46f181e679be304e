"""A cache directory against its manifest, without reading a tensor: the manifest's fields and records, the
directory's entries, the files' sizes and safetensors headers, and the shards' verification records.

No torch: the manifest and report jobs check a cache with these alone. Reading the shards' contents
is `shard_format` (and, per shard, `verification`).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import temp_path_for
from .layout import EMBEDDINGS_FILE, MANIFEST_FILE, SHARD_NAME, num_shards, samples_in_shard, shard_file_name
from .shard_layout import ShardLayout, stored_safetensors_header
from .sparse_digest import file_digest

# The manifest's format_version: Automodel's reader accepts only this one.
FORMAT_VERSION = 2


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


def shard_indices_in(cache_dir: str | os.PathLike) -> list[int]:
    """The shard indices present in a directory, sorted."""
    return sorted(int(m.group(1)) for name in os.listdir(cache_dir) if (m := SHARD_NAME.match(name)))


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a cache directory."""
    with open(Path(cache_dir) / MANIFEST_FILE) as handle:
        return json.load(handle)


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


def leftover_temp_files(cache_dir: str | os.PathLike) -> list[Path]:
    """Temp files a killed writer (or the plan job's probe) left behind."""
    suffix = temp_path_for("x").suffix
    return sorted(p for p in Path(cache_dir).iterdir() if p.suffix == suffix and p.is_file())


def shard_content_problems(cache_dir: Path, manifest: Mapping[str, Any], verify_hashes: bool) -> list[CacheProblem]:
    """Each present shard's keys, shapes, dtypes and digest against its layout and the manifest's record."""
    problems = []
    layout = ShardLayout.from_manifest(manifest)
    for record in manifest.get("shards", []):
        path = cache_dir / record["file"]
        if not path.exists():
            continue
        problems += shard_layout_problems(path, layout, int(record["num_samples"]))
        if verify_hashes and file_digest(path) != record["digest"]:
            problems.append(CacheProblem(path.name, "digest differs from the manifest (corrupted or replaced)"))
    return problems


def check_cache(cache_dir: str | os.PathLike, verify_hashes: bool = True) -> list[CacheProblem]:
    """Everything wrong with a cache directory, each shard read; empty when it is complete and intact."""
    cache_dir = Path(cache_dir)
    manifest, problems = committed_manifest(cache_dir)
    if manifest is None:
        return problems
    return directory_problems(cache_dir, manifest) + shard_content_problems(cache_dir, manifest, verify_hashes)


def verification_problems(manifest: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> list[CacheProblem]:
    """Shards the manifest lists whose verification record is missing, found problems or describes other bytes."""
    verified = {record["file"]: record for record in records}
    problems = []
    for shard in manifest.get("shards", []):
        # An Automodel shard is a file, a specforge one a directory.
        name = shard.get("file") or shard["directory"]
        record = verified.get(name)
        if record is None:
            problems.append(CacheProblem(name, "no verification record"))
        elif record["problems"]:
            problems += [CacheProblem(name, problem) for problem in record["problems"]]
        elif (record["digest"], record["bytes"]) != (shard["digest"], shard["bytes"]):
            problems.append(CacheProblem(name, "the verified bytes are not the ones the manifest records"))
    return problems
