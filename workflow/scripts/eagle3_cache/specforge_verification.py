"""Verification of one committed specforge shard directory, one sample file at a time.

The `verify_shard` rule runs it for a specforge run, as `verification.verify_committed_shard` for an
Automodel one. Each sample file is read once: its bytes' digest (`sparse_digest`) goes against the record
its shard job wrote, then they are loaded as SpecForge loads them and checked for keys, shapes, dtypes, NaN or
Inf in the hidden states, and tokens and loss mask equal to the tokenized row. Memory holds one
sample file, whatever the shard size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .cache_dir import CacheProblem, readable_manifest
from .errors import CacheConfigError
from .layout import samples_in_shard, shard_index
from .manifest import read_shard_record
from .scan_summary import ScanSummary
from .shard_stat import files_sha256, stat_sha256
from .sparse_digest import bytes_digest
from .specforge_cache import (
    SNAKEMAKE_TIMESTAMP,
    cache_entry_problems,
    manifest_record_problems,
    mapping_problems,
    records_digest,
    sample_paths,
)
from .specforge_format import nonfinite_values, read_sample_file, sample_problems
from .token_store import TokenBlock, read_token_block, read_tokenized_info, token_rows
from .verification import ShardVerification


def sample_file_problems(data: bytes, record: Mapping[str, Any], hidden_size: int) -> tuple[list[str], dict | None]:
    """One sample file's bytes against its record (size, digest) and the layout SpecForge reads; and the sample,
    when it is readable and laid out as it should be."""
    if len(data) != record["bytes"]:
        return [f"{len(data)} bytes, its shard job wrote {record['bytes']} (truncated or overwritten?)"], None
    if bytes_digest(data) != record["digest"]:
        return ["digest differs from the one recorded when it was written (changed on disk)"], None
    try:
        stored = read_sample_file(record["file"], data)
    except CacheConfigError as error:
        return [str(error)], None
    problems = sample_problems(stored, num_tokens=int(record["num_tokens"]), hidden_size=hidden_size)
    return problems, (None if problems else stored)


def scan_sample(scan: ScanSummary, stored: Mapping[str, torch.Tensor], sample: int, row: TokenBlock) -> None:
    """Fold one sample's values into `scan`: NaN or Inf in its hidden states, tokens and loss mask unlike `row`."""
    length = stored["input_ids"].shape[0]
    scan.samples += 1
    scan.total_positions += length
    scan.supervised_positions += int(stored["loss_mask"].sum())
    for key, count in nonfinite_values(stored).items():
        if count:
            scan.record("nonfinite", key, count, sample)
    for key in ("input_ids", "loss_mask"):
        if not torch.equal(stored[key], getattr(row, key)[0, :length]):
            scan.record("unlike_tokenized", key, 1, sample)
            scan.samples_unlike_tokenized = sorted({*scan.samples_unlike_tokenized, sample})


def verify_specforge_shard(
    shard_dir: Path, stats: Mapping[str, Any], tokens: TokenBlock, first_sample: int
) -> ShardVerification:
    """Everything wrong with a committed shard directory: against its job's file records and its tokenized rows."""
    started, stat = time.perf_counter(), stat_sha256(shard_dir)
    scan = ScanSummary()
    problems: list[str] = []
    records = stats["files"]
    present = {path.name for path in shard_dir.iterdir()} if shard_dir.is_dir() else set()
    stray = present - {record["file"] for record in records} - {SNAKEMAKE_TIMESTAMP}
    problems += [f"stray file {name}" for name in sorted(stray)]
    total = 0
    for row, record in enumerate(records):
        path = shard_dir / record["file"]
        if not path.exists():
            problems.append(f"{record['file']}: missing")
            continue
        data = path.read_bytes()
        total += len(data)
        found, stored = sample_file_problems(data, record, int(stats["hidden_size"]))
        if stored is not None:
            scan_sample(scan, stored, first_sample + row, token_rows(tokens, [row]))
        problems += [f"{record['file']}: {problem}" for problem in found]
    # With no problem, every file's size and digest are its record's: the records' digest is the bytes'.
    digest = records_digest(records) if not problems else ""
    content = files_sha256((record["file"], record["digest"]) for record in records) if not problems else None
    seconds = time.perf_counter() - started
    return ShardVerification(
        shard_index(shard_dir), shard_dir.name, total, digest, problems, scan.to_json(), seconds, stat, content
    )


def verify_committed_specforge_shard(
    shard_dir: Path, *, stats_path: Path, selection_path: Path, tokenized_path: Path, settings: Mapping[str, Any]
) -> ShardVerification:
    """What the `verify_shard` job checks for a specforge run: the directory against its stats and tokenized rows.

    Its arguments are `verify_committed_shard`'s, so the job calls either; the draft vocabulary
    (`selection_path`) shapes nothing a specforge file holds.
    """
    stats = read_shard_record(stats_path)
    index, shard_size = shard_index(shard_dir), settings["shard_size"]
    first = index * shard_size
    count = samples_in_shard(index, read_tokenized_info(tokenized_path).num_samples, shard_size)
    return verify_specforge_shard(shard_dir, stats, read_token_block(tokenized_path, first, first + count), first)


# --- The whole cache, every file read (a check for tests and tools; the workflow verifies per shard) ---


def stored_file_problems(cache_dir: Path, manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """The directory's entries, each sample file and the vocabulary mapping against the manifest's records."""
    problems = cache_entry_problems(cache_dir, manifest)
    for path, record in sample_paths(cache_dir, manifest):
        if path.exists():
            found, _ = sample_file_problems(path.read_bytes(), record, int(manifest["hidden_size"]))
            problems += [CacheProblem(f"{path.parent.name}/{path.name}", problem) for problem in found]
    return problems + mapping_problems(cache_dir, manifest)


def check_specforge_cache(cache_dir: str | os.PathLike) -> list[CacheProblem]:
    """Everything wrong with a specforge cache directory, every file read; empty when it is complete and intact."""
    manifest = readable_manifest(Path(cache_dir))
    if isinstance(manifest, CacheProblem):
        return [manifest]
    return manifest_record_problems(manifest) or stored_file_problems(Path(cache_dir), manifest)
