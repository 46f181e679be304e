"""The validation report on a specforge cache: a clean cache passes, each kind of damage fails its check."""

from __future__ import annotations

import json

import pytest
import torch

from eagle3_cache.cache_dir import read_manifest
from eagle3_cache.disk_plan import plan_cache
from eagle3_cache.layout import MANIFEST_FILE
from eagle3_cache.parity import parity_sample_indices
from eagle3_cache.report_html import render_html
from eagle3_cache.shard_layout import ShardLayout
from eagle3_cache.sparse_digest import file_digest
from eagle3_cache.specforge_cache import records_digest
from eagle3_cache.specforge_format import read_sample_file, serialized
from eagle3_cache.specforge_layout import sample_file_name
from eagle3_cache.specforge_sizes import specforge_files_bytes
from eagle3_cache.specforge_validation import automodel_written_bytes
from eagle3_cache.specforge_validation import disk_check as specforge_disk_check
from eagle3_cache.token_store import read_tokenized_info
from eagle3_cache.validation import disk_check
from helpers import PARITY_ROWS, TinyCache, build_tiny_cache, validated_tiny_cache

SHARD_SIZE = 4
DRAFT_VOCAB = 300  # most of the random target's vocabulary, as in test_report.py


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, tiny_chat_target) -> TinyCache:
    run_dir = tmp_path_factory.mktemp("built") / "results" / "tiny"
    return build_tiny_cache(
        run_dir, tiny_chat_target, PARITY_ROWS, shard_size=SHARD_SIZE, draft_vocab_size=DRAFT_VOCAB, format="specforge"
    )


@pytest.fixture
def cache(built_cache, tmp_path) -> TinyCache:
    """A private copy of the built cache, free to damage."""
    return built_cache.copied_to(tmp_path)


def validate(cache: TinyCache, model, num_samples: int = 3):
    """The jobs before the report (each shard directory's verification, live parity), then the report."""
    return validated_tiny_cache(cache, model, num_samples)


def failed(report) -> set[str]:
    return {check.key for check in report.checks if not check.passed}


def rewrite_sample(cache: TinyCache, sample: int, change) -> None:
    """Change one stored sample, then re-record its size and hash in its stats and the manifest: damage done
    before hashing, as a buggy build would do it."""
    manifest = read_manifest(cache.cache_dir)
    shard, row = divmod(sample, SHARD_SIZE)
    stats = json.loads(cache.stats[shard].read_text())
    path = cache.cache_dir / manifest["shards"][shard]["directory"] / stats["files"][row]["file"]
    stored = {key: value.clone() for key, value in read_sample_file(path).items()}
    change(stored)
    path.write_bytes(serialized(stored))
    stats["files"][row].update(bytes=path.stat().st_size, digest=file_digest(path))
    stats.update(bytes=sum(f["bytes"] for f in stats["files"]), digest=records_digest(stats["files"]))
    cache.stats[shard].write_text(json.dumps(stats))
    manifest["shards"][shard].update(files=stats["files"], bytes=stats["bytes"], digest=stats["digest"])
    (cache.cache_dir / MANIFEST_FILE).write_text(json.dumps(manifest))


def test_a_clean_cache_passes_every_check(cache, target_model):
    report = validate(cache, target_model)
    assert failed(report) == set(), [c.summary for c in report.checks]
    assert [c.key for c in report.checks] == [
        "integrity",
        "parity",
        "sanity",
        "vocabulary",
        "disk",
        "cost",
        "provenance",
    ]
    parity = {row["field"]: row for row in report.check("parity").series["fields"]}
    assert parity.keys() == {"hidden_state", "aux_hidden_state", "logits"}
    assert all(row["compared"] > 0 and row["differing"] == 0 for row in parity.values())
    disk = report.check("disk").figures
    assert disk["file_bytes"] == sum(p.stat().st_size for p in cache.cache_dir.glob("shard-*/*.ckpt"))
    assert disk["automodel_format_written_bytes_per_real_token"] > disk["bytes_per_real_token"]
    assert "PASS" in render_html(report)
    # The tiny target is saved as one model.safetensors: SpecForge needs an index, which is a note.
    [note] = report.check("integrity").details
    assert note.startswith("SpecForge cannot train from this target yet: ") and "write_weight_index" in note


def test_a_changed_hidden_state_fails_live_parity_naming_sample_and_position(cache, target_model):
    sample = parity_sample_indices(len(PARITY_ROWS), SHARD_SIZE, 3, seed=0)[0]

    def change(stored):
        stored["hidden_state"][0, 2, 5] += 0.5

    rewrite_sample(cache, sample, change)
    report = validate(cache, target_model)
    assert failed(report) == {"parity"}
    problems = report.check("parity").details
    assert all(f"sample {sample}: " in line and "position 2" in line for line in problems)
    assert {line.split(": ")[1] for line in problems} == {"hidden_state", "logits"}


def test_nan_and_other_tokens_fail_sanity(cache, target_model):
    def nan(stored):
        stored["aux_hidden_state"][0, 0, 0] = float("nan")

    def other_token(stored):
        stored["input_ids"][1] += 1

    rewrite_sample(cache, 1, nan)
    rewrite_sample(cache, 4, other_token)
    report = validate(cache, target_model, num_samples=0)
    assert failed(report) == {"sanity"}
    assert report.check("sanity").figures["nonfinite_aux_hidden_state_values"] == 1
    assert report.check("sanity").details == [
        "aux_hidden_state: 1 NaN or Inf values, first in sample 1",
        "1 samples whose input_ids or loss_mask differ from tokenized.h5: 4",
    ]


def test_a_deleted_file_fails_integrity_and_still_gives_a_report(cache, target_model):
    (cache.cache_dir / "shard-000001" / sample_file_name(5)).unlink()
    report = validate(cache, target_model, num_samples=0)
    assert "integrity" in failed(report)
    assert "shard-000001/sample-000000005.ckpt: missing" in report.check("integrity").details
    assert "FAIL" in render_html(report)


def test_the_file_size_and_the_automodel_bytes():
    from eagle3_cache.specforge_format import sample_tensors

    for length in (1, 37, 300):
        sample = sample_tensors(
            torch.zeros(length, dtype=torch.int64),
            torch.zeros(length, dtype=torch.int64),
            torch.zeros(length, 64, dtype=torch.bfloat16),
            torch.zeros(length, 192, dtype=torch.bfloat16),
        )
        assert specforge_files_bytes([length], 64) == len(serialized(sample))
    layout = ShardLayout(seq_length=10, aux_hidden_dim=6, draft_vocab_size=4, dtype="bf16", target_probs_topk=0)
    # Two samples of 3 and 10 tokens: 24 bytes at each of 20 positions, 6·2 + 1 + 4·2 at each of 13.
    assert automodel_written_bytes(layout, [3, 10]) == 20 * 24 + 13 * 21


def test_the_automodel_disk_check_gives_what_the_specforge_files_take(built_cache, tiny_chat_target, tmp_path):
    automodel = build_tiny_cache(
        tmp_path / "automodel", tiny_chat_target, PARITY_ROWS, shard_size=SHARD_SIZE, draft_vocab_size=DRAFT_VOCAB
    )
    disk = disk_check(automodel.cache_dir, read_manifest(automodel.cache_dir), read_tokenized_info(automodel.tokenized))
    files = list(built_cache.cache_dir.glob("shard-*/*.ckpt"))
    assert disk.figures["specforge_format_bytes"] == sum(p.stat().st_size for p in files)
    assert "the specforge format would take" in disk.summary


def test_the_disk_check_sets_the_plan_against_the_files(built_cache):
    manifest = read_manifest(built_cache.cache_dir)
    settings = {
        "draft_vocab_size": manifest["draft_vocab_size"],
        "dtype": "bf16",
        "target_probs_topk": 0,
        "seq_length": manifest["seq_length"],
        "shard_size": manifest["shard_size"],
        "format": "specforge",
    }
    check = {"margin": 0.05, "check_free_space": True}
    plan = plan_cache("tiny", built_cache.tokenized, built_cache.cache_dir, settings, check, manifest["hidden_size"])
    disk = specforge_disk_check(built_cache.cache_dir, manifest, read_tokenized_info(built_cache.tokenized), plan)
    assert disk.figures["planned_bytes"] == disk.figures["total_bytes"]
    assert abs(disk.figures["planned_allocated_bytes_error_share"]) <= 0.01
    assert "the disk plan predicted" in disk.summary
