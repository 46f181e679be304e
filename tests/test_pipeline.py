"""A shard computed by the streamed, length-bucketed pipeline holds exactly the rows of the shared function."""

from __future__ import annotations

import pytest
import torch

from eagle3_cache.cache_rows import CacheSpec, compute_cache_batch
from eagle3_cache.errors import ShardScanError
from eagle3_cache.layout import shard_file_name
from eagle3_cache.pipeline import compute_shard, length_buckets
from eagle3_cache.scan import ScanSummary
from eagle3_cache.shard_format import ShardLayout, file_sha256, read_shard_rows
from eagle3_cache.target import resolve_aux_layer_ids
from eagle3_cache.token_store import TokenBlock
from helpers import random_token_block, write_token_store

SEQ = 20
LENGTHS = [7, SEQ, 3, 12, 12, 1, 18, 9, 5, 16, 2]  # 11 samples: shards of 4, 4 and a partial 3


@pytest.fixture()
def store(tmp_path):
    block = random_token_block(LENGTHS, SEQ, seed=11)
    path = tmp_path / "tokenized.h5"
    write_token_store(path, block)
    return path, block


def spec_and_layout(model, topk=0):
    selected = torch.arange(0, 128, 3)
    spec = CacheSpec(resolve_aux_layer_ids(model, None), selected, 128, "bf16", topk)
    layout = ShardLayout(SEQ, 3 * model.config.hidden_size, spec.draft_vocab_size, "bf16", topk)
    return spec, layout


def shard(model, store_path, tmp_path, index, shard_size=4, batch_size=3, topk=0, name=None):
    spec, layout = spec_and_layout(model, topk)
    path = tmp_path / (name or shard_file_name(index))
    result = compute_shard(
        model,
        spec,
        layout,
        tokenized_path=store_path,
        num_samples=len(LENGTHS),
        shard_index=index,
        shard_size=shard_size,
        batch_size=batch_size,
        shard_path=path,
    )
    return path, result


def test_length_buckets_group_similar_lengths_longest_first():
    assert length_buckets(torch.tensor([3, 9, 3, 7, 9]), 2) == [[1, 4], [3, 0], [2]]


@pytest.mark.parametrize("index", [0, 2])
@pytest.mark.parametrize("topk", [0, 5])
def test_shard_rows_equal_the_shared_function_on_each_sample(tiny_llama, store, tmp_path, index, topk):
    store_path, block = store
    path, result = shard(tiny_llama, store_path, tmp_path, index, topk=topk)
    first = index * 4
    count = min(4, len(LENGTHS) - first)
    assert result.num_samples == count and result.first_sample == first
    stored = read_shard_rows(path, range(count))
    spec, _ = spec_and_layout(tiny_llama, topk)
    for offset in range(count):
        row = first + offset
        alone = TokenBlock(*(t[row : row + 1] for t in (block.input_ids, block.attention_mask, block.loss_mask)))
        expected = compute_cache_batch(tiny_llama, spec, alone).cpu().padded()
        assert stored.keys() == expected.keys()
        for name, values in expected.items():
            torch.testing.assert_close(stored[name][offset].float(), values[0].float(), atol=1e-2, rtol=1e-2)


def test_stats_count_real_and_computed_tokens(tiny_llama, store, tmp_path):
    store_path, _ = store
    path, result = shard(tiny_llama, store_path, tmp_path, 0, batch_size=2)
    # Shard 0 holds lengths 7, 20, 3, 12: buckets (20, 12) and (7, 3), each run one past its longest row.
    assert result.real_tokens == 7 + 20 + 3 + 12
    assert result.computed_tokens == 2 * 20 + 2 * 8
    assert result.padded_tokens == 4 * SEQ
    assert result.sha256 == file_sha256(path) and result.bytes == path.stat().st_size
    assert {"read", "forward", "distribution", "copy", "write"} <= result.seconds.keys()


def test_the_same_shard_twice_is_byte_identical(tiny_llama, store, tmp_path):
    store_path, _ = store
    first, _ = shard(tiny_llama, store_path, tmp_path, 1, name="a.safetensors")
    second, _ = shard(tiny_llama, store_path, tmp_path, 1, name="b.safetensors")
    assert first.read_bytes() == second.read_bytes()


def test_a_failing_forward_leaves_no_shard(tiny_llama, store, tmp_path, monkeypatch):
    store_path, _ = store
    import eagle3_cache.pipeline as pipeline

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return compute_cache_batch(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compute_cache_batch", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        shard(tiny_llama, store_path, tmp_path, 0, batch_size=1)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenized.h5"]


def test_a_nan_before_commit_fails_the_shard_job_naming_the_shard_the_sample_and_the_field(
    tiny_llama, store, tmp_path, monkeypatch
):
    store_path, block = store
    import eagle3_cache.pipeline as pipeline

    def with_a_nan(*args, **kwargs):
        batch = compute_cache_batch(*args, **kwargs)
        batch.computed["target_probs"][0, 0, 5] = float("nan")
        return batch

    monkeypatch.setattr(pipeline, "compute_cache_batch", with_a_nan)
    with pytest.raises(ShardScanError) as error:
        shard(tiny_llama, store_path, tmp_path, 1, batch_size=4)
    # Shard 1 holds samples 4..7; its one batch starts with its longest row.
    first_row = length_buckets(block.attention_mask[4:8].sum(dim=1), 4)[0][0]
    message = str(error.value)
    assert shard_file_name(1) in message and "not written" in message
    assert f"target_probs: 1 NaN or Inf values, first in sample {4 + first_row}" in message
    assert [p.name for p in tmp_path.iterdir()] == ["tokenized.h5"]


def test_the_stats_record_the_scan_of_the_rows_written(tiny_llama, store, tmp_path):
    store_path, _ = store
    _, result = shard(tiny_llama, store_path, tmp_path, 2)
    scan = ScanSummary.from_json(result.scan)
    assert scan.problems() == [] and scan.samples == 3
    # Each row supervises the second half of its content (helpers.random_token_block); the shift keeps it whole.
    assert scan.supervised_positions == sum(length - length // 2 for length in LENGTHS[8:])
    assert 0 < scan.max_probability_sum_error <= scan.probability_sum_tolerance
