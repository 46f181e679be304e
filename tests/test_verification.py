"""Verification of committed shards: a clean shard passes with the scan its job recorded, any flipped bit or a
truncation is caught, and a shard that fails is taken out of a cache the trainer's reader then refuses."""

from __future__ import annotations

import json
import os
import random

import pytest

from eagle3_cache import verification
from eagle3_cache.layout import MANIFEST_FILE, shard_dir_name, shard_file_name
from eagle3_cache.manifest import retire_commit
from eagle3_cache.scan_summary import ScanSummary
from eagle3_cache.token_store import read_tokenized_info
from eagle3_cache.verification import take_out_of_cache
from helpers import PARITY_ROWS, TinyCache, build_tiny_cache, verified_shard

FLIP_SEEDS = range(8)


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory, tiny_chat_target) -> TinyCache:
    run_dir = tmp_path_factory.mktemp("verified") / "results" / "tiny"
    return build_tiny_cache(run_dir, tiny_chat_target, PARITY_ROWS, shard_size=4)


@pytest.fixture
def cache(built_cache, tmp_path) -> TinyCache:
    """A private copy of the built cache, free to damage."""
    return built_cache.copied_to(tmp_path)


@pytest.mark.parametrize("read_budget", [verification.READ_BUDGET_BYTES, 1], ids=["all-rows", "one-row"])
def test_a_clean_shard_passes_with_the_scan_its_job_recorded(cache, monkeypatch, read_budget):
    monkeypatch.setattr(verification, "READ_BUDGET_BYTES", read_budget)
    for index, stats_path in enumerate(cache.stats):
        stats = json.loads(stats_path.read_text())
        result = verified_shard(cache, index)
        assert result.failures == []
        assert (result.digest, result.bytes) == (stats["digest"], stats["bytes"])
        # The scan of the rows in memory before the write and of the file read back agree to the last count.
        assert result.scan == stats["scan"]


@pytest.mark.parametrize("seed", FLIP_SEEDS)
def test_a_bit_flipped_anywhere_is_caught(cache, seed):
    shard = cache.cache_dir / shard_file_name(1)
    data = bytearray(shard.read_bytes())
    rng = random.Random(seed)
    # The first seeds hit the header, the data's first and last byte; the others anywhere.
    offset = [3, 20, len(data) - 1][seed] if seed < 3 else rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    shard.write_bytes(bytes(data))
    assert verified_shard(cache, 1).failures, f"a flip at byte {offset} of {len(data)} went unnoticed"


@pytest.mark.parametrize("rows_read_at_once", ["all", "one"])
def test_a_byte_written_into_a_shards_padding_hole_is_caught(cache, monkeypatch, rows_read_at_once):
    if rows_read_at_once == "one":
        # Then the row is read up to its own length, and its padding only where it holds data.
        monkeypatch.setattr(verification, "READ_BUDGET_BYTES", 1)
    lengths = read_tokenized_info(cache.tokenized).lengths
    sample = int(lengths.argmin())
    assert lengths[sample] < cache.settings["seq_length"]
    index, row = divmod(sample, cache.settings["shard_size"])
    shard = cache.cache_dir / shard_file_name(index)
    # The last byte of that sample's target_probs row: padding, which the writer left as a hole.
    header_bytes = int.from_bytes(shard.read_bytes()[:8], "little")
    header = json.loads(shard.read_bytes()[8 : 8 + header_bytes])
    begin, end = header["target_probs"]["data_offsets"]
    row_bytes = (end - begin) // header["target_probs"]["shape"][0]
    with open(shard, "r+b") as handle:
        os.pwrite(handle.fileno(), b"\x01", 8 + header_bytes + begin + (row + 1) * row_bytes - 1)
    failures = verified_shard(cache, index).failures
    padding = f"target_probs: 1 padding positions (attention_mask 0) holding nonzero values, first in sample {sample}"
    assert padding in failures and any("digest differs" in line for line in failures), failures


def test_a_truncated_shard_is_caught_by_its_size(cache):
    shard = cache.cache_dir / shard_file_name(0)
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size - 1000)
    [problem] = verified_shard(cache, 0).failures
    assert f"{size - 1000} bytes, its layout takes {size}" in problem


def test_a_failed_shard_is_taken_out_and_the_trainer_refuses_the_cache(cache):
    reader = pytest.importorskip("nemo_automodel.components.datasets.llm.eagle3_cache")
    shard = cache.cache_dir / shard_file_name(1)
    report = cache.run_dir / "validation_report.html"
    report.write_text("PASS")
    assert len(reader.CachedEagle3Dataset(str(cache.cache_dir))) == len(PARITY_ROWS)

    message = take_out_of_cache(shard, ["sha256 differs"])
    assert str(shard) in message and "sha256 differs" in message and "run the workflow again" in message
    assert not shard.exists() and not (cache.cache_dir / MANIFEST_FILE).exists() and not report.exists()
    with pytest.raises(FileNotFoundError, match="Was the cache fully written"):
        reader.CachedEagle3Dataset(str(cache.cache_dir))


def test_retiring_twice_or_an_absent_manifest_is_harmless(cache):
    retire_commit(cache.cache_dir, "first")
    retire_commit(cache.cache_dir, "second")
    retire_commit(cache.run_dir / "no-such-cache", "never built")
    assert not (cache.cache_dir / MANIFEST_FILE).exists()


# --- The specforge format: a shard is a directory of sample files -------------------------------


@pytest.fixture(scope="session")
def built_specforge_cache(tmp_path_factory, tiny_chat_target) -> TinyCache:
    run_dir = tmp_path_factory.mktemp("verified-specforge") / "results" / "tiny"
    return build_tiny_cache(run_dir, tiny_chat_target, PARITY_ROWS, shard_size=4, format="specforge")


@pytest.fixture
def specforge_cache(built_specforge_cache, tmp_path) -> TinyCache:
    """A private copy of the built specforge cache, free to damage."""
    return built_specforge_cache.copied_to(tmp_path)


def test_a_clean_shard_directory_passes_with_the_scan_its_job_recorded(specforge_cache):
    for index, stats_path in enumerate(specforge_cache.stats):
        stats = json.loads(stats_path.read_text())
        result = verified_shard(specforge_cache, index)
        assert result.failures == []
        assert (result.file, result.digest, result.bytes) == (shard_dir_name(index), stats["digest"], stats["bytes"])
        scan = ScanSummary.from_json(result.scan)
        assert scan.samples == stats["num_samples"] and scan.findings == []


@pytest.mark.parametrize("seed", FLIP_SEEDS)
def test_a_bit_flipped_in_any_sample_file_is_caught(specforge_cache, seed):
    rng = random.Random(seed)
    path = rng.choice(sorted(specforge_cache.shard(1).glob("*.ckpt")))
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    [problem] = verified_shard(specforge_cache, 1).failures
    assert problem == f"{path.name}: digest differs from the one recorded when it was written (changed on disk)"


def test_a_missing_a_stray_and_a_truncated_file_are_each_named(specforge_cache):
    directory = specforge_cache.shard(0)
    first, second = sorted(directory.glob("*.ckpt"))[:2]
    first.unlink()
    (directory / "notes.txt").write_text("not a sample")
    with open(second, "r+b") as handle:
        handle.truncate(100)
    failures = verified_shard(specforge_cache, 0).failures
    assert failures[0] == "stray file notes.txt"
    assert f"{first.name}: missing" in failures
    assert any(line.startswith(f"{second.name}: 100 bytes, its shard job wrote") for line in failures)


def test_a_failed_shard_directory_is_taken_out_and_specforge_would_not_find_it(specforge_cache):
    directory = specforge_cache.shard(1)
    take_out_of_cache(directory, ["sha256 differs"])
    assert not directory.exists() and not (specforge_cache.cache_dir / MANIFEST_FILE).exists()
    assert (specforge_cache.shard(0)).is_dir()


def test_the_scan_refuses_values_of_another_library_than_its_tokens():
    import numpy as np
    import torch

    from eagle3_cache.scan import ShardScan
    from eagle3_cache.token_store import TokenBlock

    rows = np.ones((2, 4), dtype=np.int64)
    scan = ShardScan(0, TokenBlock(rows, rows, rows), draft_vocab_size=8, cache_dtype="bf16")
    with pytest.raises(TypeError, match="input_ids: the scan's tokens and values must be arrays of one library"):
        scan.add("input_ids", np.arange(2), torch.ones((2, 4), dtype=torch.long))


def test_a_shard_record_from_before_digests_is_refused_in_one_line(cache):
    from eagle3_cache.errors import CacheConfigError

    stats = json.loads(cache.stats[0].read_text())
    stats["sha256"] = stats.pop("digest")
    cache.stats[0].write_text(json.dumps(stats))
    with pytest.raises(CacheConfigError, match=r"written by an older eagle3-cache \(it has no digest\); delete it"):
        verified_shard(cache, 0)
