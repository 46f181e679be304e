"""A specforge cache directory as a whole: its manifest (the commit point), stale-file removal, and the checks of
the directory against it that open no sample file. No torch.

`manifest.json` is ours (SpecForge ignores it): the shared fields of the Automodel manifest, the shard
directories, and a size and digest per sample file, which the checks hold the directory to; the checker
that reads every file is `specforge_verification.check_specforge_cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .cache_dir import CacheProblem, read_manifest, shard_indices_in
from .errors import CacheConfigError
from .layout import (
    EMBEDDINGS_FILE,
    MANIFEST_FILE,
    SHARD_DIR_NAME,
    SPECFORGE_FORMAT,
    VOCAB_MAPPING_FILE,
    num_shards,
    samples_in_shard,
    shard_dir_name,
    shard_file_name,
)
from .provenance import file_sha256
from .specforge_layout import SPECFORGE_VERSION, sample_file_name, staging_root, vocab_mapping_problems

log = logging.getLogger(__name__)

# The empty file Snakemake leaves in a finished directory output (SpecForge reads only *.ckpt).
SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"
# What the cache checker reads from the manifest.
REQUIRED_MANIFEST_KEYS = (
    "num_samples",
    "shard_size",
    "hidden_size",
    "selected_token_ids",
    "target_vocab_size",
    "vocab_mapping",
    "shards",
)
# Fields of Automodel's manifest that do not describe these files.
AUTOMODEL_ONLY_KEYS = ("format_version", "target_probs_topk")


def records_digest(files: Sequence[Mapping[str, Any]]) -> str:
    """One digest for a shard directory: of its file records (names, sizes and digests) in order."""
    return hashlib.sha256(json.dumps(list(files), sort_keys=True).encode()).hexdigest()


def sample_paths(cache_dir: Path, manifest: Mapping[str, Any]) -> Iterator[tuple[Path, Mapping[str, Any]]]:
    """Every sample file the manifest records, in sample order, with its record."""
    for shard in manifest["shards"]:
        for record in shard["files"]:
            yield cache_dir / shard["directory"] / record["file"], record


def shard_record(stats: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's record of one shard directory."""
    return {
        "directory": shard_dir_name(stats["shard"]),
        "num_samples": stats["num_samples"],
        "num_files": len(stats["files"]),
        "bytes": stats["bytes"],
        "digest": stats["digest"],
        "files": stats["files"],
    }


def specforge_manifest(
    cache_dir: Path, stats: Sequence[Mapping[str, Any]], checked: Mapping[str, Any]
) -> dict[str, Any]:
    """Our manifest of a specforge cache, from the one `checked_manifest` gave for its shards' stats: the
    shard directories, file counts and a digest per file; files of the other format are removed.

    Shards built under the other format fail `checked_manifest`: `format` is one of the settings their
    fingerprint covers.
    """
    manifest = {key: value for key, value in checked.items() if key not in AUTOMODEL_ONLY_KEYS}
    mapping = cache_dir / VOCAB_MAPPING_FILE
    problems = vocab_mapping_problems(mapping, manifest["selected_token_ids"], manifest["target_vocab_size"])
    if problems:
        raise CacheConfigError(f"{mapping}: {problems[0]}. Delete it and run the workflow again.")
    remove_stale_specforge_files(cache_dir, len(stats))
    manifest.update(
        {
            "specforge_version": SPECFORGE_VERSION,
            "hidden_size": stats[0]["hidden_size"],
            "lm_head_key": stats[0]["lm_head_key"],
            "vocab_mapping": {"file": VOCAB_MAPPING_FILE, "sha256": file_sha256(mapping), "draft_ids": "ascending"},
            "num_files": sum(len(s["files"]) for s in stats),
            "shards": [shard_record(s) for s in stats],
        }
    )
    return manifest


def shard_dir_indices_in(cache_dir: Path) -> list[int]:
    """The shard directories present in a cache directory, sorted."""
    return sorted(int(m.group(1)) for p in cache_dir.iterdir() if p.is_dir() and (m := SHARD_DIR_NAME.match(p.name)))


def remove_paths(paths: Sequence[Path]) -> None:
    """Delete files and directory trees, logging each."""
    for path in paths:
        log.info("removing stale %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def remove_stale_specforge_files(cache_dir: Path, shard_count: int) -> None:
    """Delete shard directories beyond the current count, staging leftovers, and the Automodel format's files."""
    stale = [cache_dir / shard_dir_name(i) for i in shard_dir_indices_in(cache_dir) if i >= shard_count]
    stale += [cache_dir / shard_file_name(i) for i in shard_indices_in(cache_dir)]
    stale += [path for path in (cache_dir / EMBEDDINGS_FILE, staging_root(cache_dir)) if path.exists()]
    remove_paths(stale)


def remove_specforge_files(cache_dir: Path) -> None:
    """Delete what the specforge format left in a cache directory that now holds the Automodel format."""
    stale = [cache_dir / shard_dir_name(i) for i in shard_dir_indices_in(cache_dir)]
    stale += [path for path in (cache_dir / VOCAB_MAPPING_FILE, staging_root(cache_dir)) if path.exists()]
    remove_paths(stale)


def manifest_format(cache_dir: str | os.PathLike) -> str:
    """The output format a cache directory's manifest records: "automodel" when it records none (as
    Automodel's own manifests do) or cannot be read, which the Automodel checks then report."""
    try:
        return read_manifest(cache_dir).get("format", "automodel")
    except (OSError, json.JSONDecodeError):
        return "automodel"


def manifest_record_problems(manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """The manifest must be ours, of the specforge format, and its records must cover every sample in order."""
    if manifest.get("format") != SPECFORGE_FORMAT:
        return [CacheProblem(MANIFEST_FILE, f"format {manifest.get('format')!r}, expected {SPECFORGE_FORMAT!r}")]
    missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        return [CacheProblem(MANIFEST_FILE, f"missing field {key!r}") for key in missing]
    n, size = int(manifest["num_samples"]), int(manifest["shard_size"])
    expected = [
        (shard_dir_name(i), [sample_file_name(g) for g in range(i * size, i * size + samples_in_shard(i, n, size))])
        for i in range(num_shards(n, size))
    ]
    got = [(s["directory"], [f["file"] for f in s["files"]]) for s in manifest["shards"]]
    if got != expected:
        return [CacheProblem(MANIFEST_FILE, "shard records do not cover samples 0..num_samples-1 in order")]
    return []


def cache_entry_problems(cache_dir: Path, manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """Shard directories missing or not recorded, stray entries, stray or missing files inside a shard."""
    recorded = {s["directory"]: {f["file"] for f in s["files"]} for s in manifest["shards"]}
    present = {p.name for p in cache_dir.iterdir()}
    problems = [CacheProblem(name, "missing") for name in sorted(recorded.keys() - present)]
    known = recorded.keys() | {MANIFEST_FILE, VOCAB_MAPPING_FILE}
    stray = sorted(present - known)
    problems += [CacheProblem(name, "stray file or directory (SpecForge may read it)") for name in stray]
    if VOCAB_MAPPING_FILE not in present:
        problems.append(CacheProblem(VOCAB_MAPPING_FILE, "missing"))
    for directory, files in recorded.items():
        if directory in present:
            inside = {p.name for p in (cache_dir / directory).iterdir()}
            problems += [CacheProblem(f"{directory}/{name}", "missing") for name in sorted(files - inside)]
            stray = sorted(inside - files - {SNAKEMAKE_TIMESTAMP})
            problems += [CacheProblem(f"{directory}/{name}", "stray file") for name in stray]
    return problems


def mapping_problems(cache_dir: Path, manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """The vocabulary mapping, when present, against the manifest's draft vocabulary and its recorded sha256."""
    mapping = cache_dir / VOCAB_MAPPING_FILE
    if not mapping.exists():
        return []
    found = vocab_mapping_problems(mapping, manifest["selected_token_ids"], int(manifest["target_vocab_size"]))
    if file_sha256(mapping) != manifest["vocab_mapping"]["sha256"]:
        found.append("sha256 differs from the manifest (corrupted or replaced)")
    return [CacheProblem(VOCAB_MAPPING_FILE, problem) for problem in found]
