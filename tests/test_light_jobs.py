"""The jobs that need neither torch nor transformers import neither: the commit (manifest), the disk plan and
the report, each run as Snakemake runs it, in an interpreter of its own, on a tiny cache of either format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from eagle3_cache.cache_dir import read_manifest
from helpers import (
    PARITY_ROWS,
    TinyCache,
    build_tiny_cache,
    check_tiny_parity,
    manifest_namespace,
    plan_namespace,
    run_script_alone,
    run_script_process,
    validate_namespace,
    verify_namespace,
)

# Most of the random target's vocabulary, so that the report passes (as in test_report.py).
DRAFT_VOCAB = 300


@pytest.fixture(scope="module", params=["automodel", "specforge"])
def built_cache(request, tmp_path_factory, tiny_chat_target, target_model) -> TinyCache:
    run_dir = tmp_path_factory.mktemp(request.param) / "results" / "tiny"
    cache = build_tiny_cache(
        run_dir, tiny_chat_target, PARITY_ROWS, shard_size=4, draft_vocab_size=DRAFT_VOCAB, format=request.param
    )
    check_tiny_parity(cache, target_model, num_samples=2)
    return cache


@pytest.fixture
def cache(built_cache, tmp_path) -> TinyCache:
    """A private copy of the built cache."""
    return built_cache.copied_to(tmp_path)


def test_the_manifest_job_imports_neither_and_commits_the_same_manifest(cache, tmp_path):
    before = read_manifest(cache.cache_dir)
    (cache.cache_dir / "manifest.json").unlink()
    assert run_script_alone("write_manifest.py", manifest_namespace(cache), tmp_path) == []
    after = read_manifest(cache.cache_dir)
    assert after["shards"] == before["shards"] and after["selected_token_ids"] == before["selected_token_ids"]


def test_the_verification_job_of_an_automodel_shard_imports_neither(cache, tmp_path):
    """A specforge shard's sample files are read as SpecForge reads them, with torch."""
    verified = tmp_path / "verified.json"
    heavy = run_script_alone("verify_shard.py", verify_namespace(cache, 1, verified), tmp_path)
    assert heavy == ([] if cache.settings["format"] == "automodel" else ["torch"])
    assert json.loads(verified.read_text())["digest"] == json.loads(cache.stats[1].read_text())["digest"]


def replaced_keeping_timestamps(path: Path, data: bytes) -> None:
    """`path` replaced by a new file (another inode) holding `data`, its size and mtime kept as they were."""
    stat = path.stat()
    assert stat.st_size == len(data)
    path.with_name(path.name + ".new").write_bytes(data)
    os.replace(path.with_name(path.name + ".new"), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def first_file(shard: Path) -> Path:
    return min(shard.iterdir()) if shard.is_dir() else shard


def test_the_commit_refuses_a_shard_replaced_since_its_verification(cache, tmp_path):
    """Same size, same mtime, other bytes: the stat's inode tells, the bytes are hashed, and the commit is
    refused with one line; the shard's record is removed, so that the next run verifies it again."""
    target = first_file(cache.shard(1))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    replaced_keeping_timestamps(target, bytes(data))
    (cache.cache_dir / "manifest.json").unlink()
    result = run_script_process("write_manifest.py", manifest_namespace(cache), tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1:] == [
        f"Error: {cache.cache_dir}: {cache.shard(1).name} changed on disk since verified (other bytes than the "
        "verification read), so the cache was not committed and their verification records were removed; run the "
        "workflow again to verify them again (a shard that fails is rebuilt)."
    ]
    assert not (cache.cache_dir / "manifest.json").exists()
    assert [path.exists() for path in cache.verified] == [index != 1 for index in range(len(cache.verified))]


def test_the_commit_rehashes_a_copied_shard_and_commits_it(cache, tmp_path):
    """A copy (new inode) of the same bytes is hashed once, and its record brought up to date."""
    shard = first_file(cache.shard(0))
    replaced_keeping_timestamps(shard, shard.read_bytes())
    stale = json.loads(cache.verified[0].read_text())["stat_sha256"]
    (cache.cache_dir / "manifest.json").unlink()
    assert run_script_alone("write_manifest.py", manifest_namespace(cache), tmp_path) == []
    assert read_manifest(cache.cache_dir)["num_samples"] > 0
    assert json.loads(cache.verified[0].read_text())["stat_sha256"] != stale


def test_the_plan_job_imports_neither(cache, tmp_path):
    assert run_script_alone("plan_disk.py", plan_namespace(cache), tmp_path) == []
    plan = json.loads((cache.run_dir / "plan.json").read_text())
    assert plan["format"] == cache.settings["format"] and plan["apparent_bytes"] > 0


def test_the_report_job_imports_neither_and_passes(cache, tmp_path):
    assert run_script_alone("plan_disk.py", plan_namespace(cache), tmp_path) == []
    assert run_script_alone("validate.py", validate_namespace(cache, strict=True), tmp_path) == []
    assert json.loads((cache.run_dir / "validation.json").read_text())["passed"]


def test_a_damaged_shard_stats_file_is_named_with_what_to_do(cache):
    from eagle3_cache.errors import CacheConfigError
    from eagle3_cache.manifest import read_shard_stats

    cache.stats[1].write_text('{"shard": 1, "sha2')
    with pytest.raises(
        CacheConfigError, match=r"shard-000001.*: not valid JSON .*; delete it and run the workflow again"
    ):
        read_shard_stats(cache.stats)


def test_a_damaged_verification_record_is_verified_again(cache):
    from eagle3_cache.shard_stat import unverified_shards

    cache.verified[0].write_text("{")
    assert unverified_shards(cache.cache_dir, cache.verified) == [
        "shard-000000.json (an unreadable verification record)"
    ]
    assert not cache.verified[0].exists() and all(path.exists() for path in cache.verified[1:])
