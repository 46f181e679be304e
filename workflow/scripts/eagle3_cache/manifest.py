"""The manifest: the commit point of a cache, written only once every shard of the run exists and passed verification.

Before writing it we check that the shards were all built under the same settings, target and
draft vocabulary (their stats files record these), and remove shards an older configuration left
beyond the current count, so a cache never mixes stale and fresh shards.

Every job that changes a file of the cache directory first retires the manifest
(`retire_commit`). NeMo Automodel's reader refuses a directory without one, so a trainer never
finds a manifest beside shards it does not describe, whichever job is killed when; the manifest
rule writes a new one once every shard is back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import fsync_directory, read_json_file, write_json_atomic
from .cache_dir import FORMAT_VERSION, leftover_temp_files, shard_indices_in
from .errors import CacheConfigError
from .layout import (
    INPUT_DIGESTS,
    MANIFEST_FILE,
    VALIDATION_JSON,
    VALIDATION_REPORT,
    num_shards,
    samples_in_shard,
    shard_file_name,
)
from .provenance import ids_fingerprint, package_versions, producer, settings_fingerprint
from .sparse_digest import ALGORITHM as DIGEST_ALGORITHM
from .token_store import TokenizedInfo

log = logging.getLogger(__name__)


def retire_commit(cache_dir: str | os.PathLike, reason: str) -> None:
    """Take a cache out of service before one of its files changes: remove manifest.json, then the run's report.

    The removal is made durable before the caller goes on to change a shard. The report goes too:
    it vouched for the retired manifest.
    """
    cache_dir = Path(cache_dir)
    manifest = cache_dir / MANIFEST_FILE
    with contextlib.suppress(FileNotFoundError):  # already retired, maybe by a job running beside this one
        manifest.unlink()
        log.info("retired %s: %s", manifest, reason)
    if cache_dir.is_dir():
        fsync_directory(cache_dir)
    for name in (VALIDATION_REPORT, VALIDATION_JSON):
        (cache_dir.parent / name).unlink(missing_ok=True)


def commit_manifest(path: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Write manifest.json, the commit point, atomically.

    It is then touched: the cache directory is an input of the manifest rule (its mtime says when
    a file was added or removed; see workflow/rules/manifest.smk), and renaming the manifest into
    place changed that mtime once more, which must not count as a change.
    """
    write_json_atomic(path, manifest)
    os.utime(path)


# A shard's stats or verification record that cannot be read: removing it reruns the job that writes it.
RECORD_REMEDY = "delete it and run the workflow again, which rewrites it (a shard's stats: by recomputing the shard)"


def read_shard_stats(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Per-shard JSON records (the shard stats, the verification records), in shard order."""
    return sorted(map(read_shard_record, paths), key=lambda s: s["shard"])


def read_shard_record(path: str | Path) -> dict[str, Any]:
    """A shard's stats or verification record; one written before shards had a `digest` is refused in one line."""
    record = read_json_file(path, RECORD_REMEDY)
    if "digest" not in record:
        raise CacheConfigError(f"{path} was written by an older eagle3-cache (it has no digest); {RECORD_REMEDY}")
    return record


def inconsistent_shards(
    stats: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], selected_token_ids: list[int], info: TokenizedInfo
) -> list[str]:
    """Why the shards cannot form one cache (empty when they can)."""
    expected_fingerprint = settings_fingerprint(settings)
    expected_vocab = ids_fingerprint(selected_token_ids)
    first_model = stats[0]["model_identity"] if stats else None
    reasons = []
    for s in stats:
        name = shard_file_name(s["shard"])
        want_samples = samples_in_shard(s["shard"], info.num_samples, settings["shard_size"])
        if s["settings_fingerprint"] != expected_fingerprint:
            reasons.append(f"{name} was built under other settings")
        if s["selected_token_ids_sha256"] != expected_vocab:
            reasons.append(f"{name} was built with another draft vocabulary")
        if s["model_identity"] != first_model:
            reasons.append(f"{name} was built with another target ({s['model_identity']} vs {first_model})")
        if s["num_samples"] != want_samples:
            reasons.append(f"{name} holds {s['num_samples']} samples, expected {want_samples}")
    return reasons


def remove_stale_files(cache_dir: Path, shard_count: int) -> list[Path]:
    """Delete shards beyond the current count and temp files killed writers left; returns them."""
    stale = [cache_dir / shard_file_name(i) for i in shard_indices_in(cache_dir) if i >= shard_count]
    stale += leftover_temp_files(cache_dir)
    for path in stale:
        log.info("removing stale %s", path)
        path.unlink()
    return stale


def automodel_fields(
    settings: Mapping[str, Any], first: Mapping[str, Any], selected_token_ids: list[int], info: TokenizedInfo
) -> dict[str, Any]:
    """The fields NeMo Automodel's reader checks, from the settings and the first shard's stats."""
    return {
        "format_version": FORMAT_VERSION,
        "target_model": settings["target_model"],
        "target_vocab_size": first["target_vocab_size"],
        "draft_vocab_size": len(selected_token_ids),
        "seq_length": settings["seq_length"],
        "dtype": settings["dtype"],
        "num_samples": info.num_samples,
        "shard_size": settings["shard_size"],
        "target_probs_topk": settings["target_probs_topk"],
        "aux_hidden_dim": first["aux_hidden_dim"],
        "aux_layer_ids": first["aux_layer_ids"],
        "selected_token_ids": selected_token_ids,
        "input_data": settings["input_data"],
        "split": settings["split"],
        "shuffle_seed": settings["shuffle_seed"],
        "mask_reasoning_content": settings["mask_reasoning_content"],
        "mask_generation_prompt": settings["mask_generation_prompt"],
    }


def provenance_fields(settings: Mapping[str, Any], stats: Sequence[Mapping[str, Any]], info: TokenizedInfo) -> dict:
    """Beyond Automodel's fields (its reader ignores them): what built the cache, and each shard's record."""
    return {
        "revision": settings["revision"],
        "data_revision": settings["data_revision"],
        "trust_remote_code": settings["trust_remote_code"],
        "format": settings["format"],
        "compute_dtype": settings["compute_dtype"],
        "target_model_identity": stats[0]["model_identity"],
        "tokenizer_sha256": info.tokenizer_hash,
        "chat_template_sha256": info.chat_template_hash,
        "input_sha256": {name: settings[name] for name in INPUT_DIGESTS},
        "settings_fingerprint": settings_fingerprint(settings),
        "shard_digest": DIGEST_ALGORITHM,
        "producer": producer(),
        "packages": package_versions(),
        "shards": [
            {
                "file": shard_file_name(s["shard"]),
                "num_samples": s["num_samples"],
                "bytes": s["bytes"],
                "digest": s["digest"],
            }
            for s in stats
        ],
    }


def checked_manifest(
    cache_dir: Path,
    settings: Mapping[str, Any],
    stats: Sequence[Mapping[str, Any]],
    selected_token_ids: list[int],
    info: TokenizedInfo,
) -> dict[str, Any]:
    """The manifest for a complete, consistent shard set; stale files are removed first."""
    shard_count = num_shards(info.num_samples, settings["shard_size"])
    if [s["shard"] for s in stats] != list(range(shard_count)):
        raise CacheConfigError(
            f"{cache_dir}: expected stats for shards 0..{shard_count - 1}, got {[s['shard'] for s in stats]}. "
            "Re-run the workflow so every shard is built."
        )
    reasons = inconsistent_shards(stats, settings, selected_token_ids, info)
    if reasons:
        raise CacheConfigError(
            f"{cache_dir}: shards do not form one cache: "
            + "; ".join(reasons)
            + ". Delete the listed shards (or re-run with --forcerun compute_shard) and run again."
        )
    remove_stale_files(cache_dir, shard_count)
    return {
        **automodel_fields(settings, stats[0], selected_token_ids, info),
        **provenance_fields(settings, stats, info),
    }
