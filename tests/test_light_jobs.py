"""The jobs that need neither torch nor transformers import neither: the commit (manifest), the disk plan and
the report, each run as Snakemake runs it, in an interpreter of its own, on a tiny cache of either format."""

from __future__ import annotations

import json

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
    validate_namespace,
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


def test_the_plan_job_imports_neither(cache, tmp_path):
    assert run_script_alone("plan_disk.py", plan_namespace(cache), tmp_path) == []
    plan = json.loads((cache.run_dir / "plan.json").read_text())
    assert plan["format"] == cache.settings["format"] and plan["apparent_bytes"] > 0


def test_the_report_job_imports_neither_and_passes(cache, tmp_path):
    assert run_script_alone("plan_disk.py", plan_namespace(cache), tmp_path) == []
    assert run_script_alone("validate.py", validate_namespace(cache, strict=True), tmp_path) == []
    assert json.loads((cache.run_dir / "validation.json").read_text())["passed"]
