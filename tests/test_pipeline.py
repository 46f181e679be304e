"""A shard computed by the streamed pipeline, in forwards within a position budget, holds exactly the rows of the
shared function."""

from __future__ import annotations

import json

import pytest
import torch

from eagle3_cache import CACHE_SEMANTICS_VERSION, pipeline
from eagle3_cache.cache_rows import CacheSpec, compute_cache_batch
from eagle3_cache.errors import CacheConfigError, ShardScanError
from eagle3_cache.layout import shard_file_name
from eagle3_cache.pipeline import ShardJob, compute_shard, forward_batches, forward_budget, run_shard_job
from eagle3_cache.scan_summary import ScanSummary
from eagle3_cache.shard_format import read_shard_rows
from eagle3_cache.shard_layout import ShardLayout
from eagle3_cache.sparse_digest import file_digest
from eagle3_cache.target import resolve_aux_layer_ids
from eagle3_cache.token_store import TokenBlock
from helpers import fail_second_forward, random_token_block, tiny_llama_config, write_token_store

SEQ = 20
# 11 samples: shards of 4, 4 and a partial 3, each with rows close enough in length to share a forward.
LENGTHS = [14, SEQ, 13, 19, 12, 1, 11, 2, 5, 16, 15]


@pytest.fixture()
def store(tmp_path):
    block = random_token_block(LENGTHS, SEQ, seed=11)
    path = tmp_path / "tokenized.h5"
    write_token_store(path, block)
    return path, block


def spec_and_layout(model, topk=0, dtype="bf16"):
    selected = torch.arange(0, 128, 3)
    spec = CacheSpec(resolve_aux_layer_ids(model, None), selected, 128, dtype, topk)
    layout = ShardLayout(SEQ, 3 * model.config.hidden_size, spec.draft_vocab_size, dtype, topk)
    return spec, layout


def shard(
    model,
    store_path,
    tmp_path,
    index,
    shard_size=4,
    batch_size=3,
    topk=0,
    name=None,
    tokens_per_forward=None,
    dtype="bf16",
):
    spec, layout = spec_and_layout(model, topk, dtype)
    path = tmp_path / (name or shard_file_name(index))
    job = ShardJob(store_path, len(LENGTHS), index, shard_size, batch_size, path, tokens_per_forward)
    result = compute_shard(model, spec, layout, job)
    return path, result


def test_forward_batches_group_similar_lengths_longest_first():
    # Widths are one past the longest row: 10, 10, 8, 4, 4.
    assert forward_batches(torch.tensor([3, 9, 3, 7, 9]), 10, 20) == [[1, 4], [3], [0, 2]]


def test_rows_of_similar_length_fill_a_forward_up_to_the_budget():
    lengths = torch.tensor([30, 29, 28, 31, 30])  # widths 31, 30, 29, 32, 31
    assert forward_batches(lengths, 64, 100) == [[3, 0, 4], [1, 2]]
    assert forward_batches(lengths, 64, 64) == [[3, 0], [4, 1], [2]]
    assert forward_batches(lengths, 64, 10_000) == [[3, 0, 4, 1, 2]]


def test_no_row_is_padded_by_more_than_an_eighth_of_its_width():
    # Widths 10, 7, 9: 10 pads the 9 by a ninth, the 7 by three sevenths.
    assert forward_batches(torch.tensor([9, 6, 8]), 10, 10_000) == [[0, 2], [1]]


def test_a_row_wider_than_the_budget_runs_alone():
    assert forward_batches(torch.tensor([9, 9, 8]), 10, 5) == [[0], [1], [2]]


def test_every_row_runs_once_within_the_budget_and_the_padding_limit():
    generator = torch.Generator().manual_seed(3)
    for budget in (1, 17, 64, 200, 10_000):
        lengths = torch.randint(1, 50, (97,), generator=generator)
        batches = forward_batches(lengths, 50, budget)
        assert sorted(row for rows in batches for row in rows) == list(range(97))
        for rows in batches:
            widths = [min(50, int(lengths[row]) + 1) for row in rows]
            assert widths == sorted(widths, reverse=True)
            assert len(rows) == 1 or len(rows) * widths[0] <= budget
            assert all(8 * widths[0] <= 9 * width for width in widths)


def test_the_default_budget_is_a_padded_batch_and_a_bad_one_names_the_key():
    assert forward_budget(None, 4, 512) == 2048
    assert forward_budget(300, 4, 512) == 300
    with pytest.raises(CacheConfigError, match="tokens_per_forward"):
        forward_budget(0, 4, 512)


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
    # Shard 0 holds lengths 14, 20, 13, 19: forwards (20, 19) and (14, 13), each run one past its longest row.
    assert result.real_tokens == 14 + 20 + 13 + 19
    assert result.computed_tokens == 2 * 20 + 2 * 15
    assert result.padded_tokens == 4 * SEQ
    assert (result.positions_per_forward.budget, result.positions_per_forward.forwards) == (2 * SEQ, 2)
    assert (result.positions_per_forward.mean, result.positions_per_forward.max) == ((40 + 30) / 2, 40)
    assert result.digest == file_digest(path) and result.bytes == path.stat().st_size
    assert {"read", "forward", "distribution", "copy", "write"} <= result.seconds.keys()


def test_the_same_shard_twice_is_byte_identical(tiny_llama, store, tmp_path):
    store_path, _ = store
    first, _ = shard(tiny_llama, store_path, tmp_path, 1, name="a.safetensors")
    second, _ = shard(tiny_llama, store_path, tmp_path, 1, name="b.safetensors")
    assert first.read_bytes() == second.read_bytes()


def test_a_failing_forward_leaves_no_shard(tiny_llama, store, tmp_path, monkeypatch):
    store_path, _ = store
    fail_second_forward(monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        shard(tiny_llama, store_path, tmp_path, 0, batch_size=1)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenized.h5"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_the_budget_changes_stored_values_only_by_fp32_rounding(tiny_llama, store, tmp_path, index):
    # A row run at another width goes through other kernel blockings, so fp32 sums round differently:
    # the stored values agree to rounding, not bit for bit.
    store_path, _ = store
    budgets = [1, 2 * SEQ, 5 * SEQ, 10_000]
    shards = [
        shard(tiny_llama, store_path, tmp_path, index, dtype="fp32", tokens_per_forward=budget, name=f"{budget}.st")
        for budget in budgets
    ]
    forwards = [result.positions_per_forward.forwards for _, result in shards]
    assert forwards[0] > forwards[-1], "the budgets must group the rows differently"
    count = shards[0][1].num_samples
    alone = read_shard_rows(shards[0][0], range(count))
    for path, _ in shards[1:]:
        stored = read_shard_rows(path, range(count))
        for name, values in alone.items():
            if values.is_floating_point():
                torch.testing.assert_close(stored[name], values, atol=1e-6, rtol=1e-5)
            else:
                assert torch.equal(stored[name], values), name


def test_a_shard_job_records_positions_per_forward_and_frees_its_gpus_before_the_commit(
    tiny_llama_dir, store, tmp_path, monkeypatch
):
    store_path, _ = store
    events = []
    commit = pipeline.ShardWriter.commit
    monkeypatch.setattr(pipeline.ShardWriter, "commit", lambda writer: events.append("commit") or commit(writer))
    from eagle3_cache.vocab import write_vocab_selection

    selection = tmp_path / "vocab_selection.pt"
    write_vocab_selection(selection, torch.arange(0, 128, 3), 128)
    settings = {
        "target_model": str(tiny_llama_dir),
        "revision": None,
        "trust_remote_code": False,
        "aux_layer_ids": None,
        "dtype": "bf16",
        "compute_dtype": "auto",
        "target_probs_topk": 0,
        "seq_length": SEQ,
        "shard_size": 4,
        "cache_semantics_version": CACHE_SEMANTICS_VERSION,
        "target_weights_sha256": None,
        "format": "automodel",
    }
    stats = run_shard_job(
        settings,
        tokenized_path=store_path,
        selection_path=selection,
        shard_index=0,
        batch_size=1,
        tokens_per_forward=3 * SEQ,
        device=torch.device("cpu"),
        num_gpus=1,
        shard_path=tmp_path / shard_file_name(0),
        stats_path=tmp_path / "stats.json",
        release_gpus=lambda: events.append("release"),
    )
    assert events == ["release", "commit"]
    # Shard 0 holds lengths 14, 20, 13, 19: (20, 19) at width 20; 14 would be padded by 5, so (14, 13) at 15.
    assert stats["positions_per_forward"] == {"budget": 60, "forwards": 2, "mean": 35.0, "max": 40}
    assert stats["cuda_memory"] == []
    assert json.loads((tmp_path / "stats.json").read_text())["positions_per_forward"]["forwards"] == 2


def test_a_nan_before_commit_fails_the_shard_job_naming_the_shard_the_sample_and_the_field(
    tiny_llama, store, tmp_path, monkeypatch
):
    store_path, block = store
    import eagle3_cache.pipeline as pipeline

    calls = []

    def with_a_nan(*args, **kwargs):
        batch = compute_cache_batch(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            batch.computed["target_probs"][0, 0, 5] = float("nan")
        return batch

    monkeypatch.setattr(pipeline, "compute_cache_batch", with_a_nan)
    with pytest.raises(ShardScanError) as error:
        shard(tiny_llama, store_path, tmp_path, 1, batch_size=4)
    # Shard 1 holds samples 4..7; its first forward starts with its longest row.
    first_row = forward_batches(block.attention_mask[4:8].sum(dim=1), SEQ, 4 * SEQ)[0][0]
    message = str(error.value)
    assert shard_file_name(1) in message and "not written" in message
    assert f"target_probs: 1 NaN or Inf values, first in sample {4 + first_row}" in message
    assert [p.name for p in tmp_path.iterdir()] == ["tokenized.h5"]


def test_a_failed_shard_leaves_no_writer_behind_to_touch_the_next_one(tiny_llama, store, tmp_path, monkeypatch):
    # The writer thread of a failed shard must have ended before its file is closed: left running, it would
    # write its rows through a descriptor the next shard's file reuses.
    store_path, _ = store
    fresh, _ = shard(tiny_llama, store_path, tmp_path, 0, dtype="fp32", tokens_per_forward=1, name="fresh.st")
    with monkeypatch.context() as patched:
        fail_second_forward(patched)
        with pytest.raises(RuntimeError, match="out of memory"):
            shard(tiny_llama, store_path, tmp_path, 0, batch_size=1, name="failed.safetensors")
    after, _ = shard(tiny_llama, store_path, tmp_path, 0, dtype="fp32", tokens_per_forward=1, name="after.st")
    assert after.read_bytes() == fresh.read_bytes()


def test_the_stats_record_the_scan_of_the_rows_written(tiny_llama, store, tmp_path):
    store_path, _ = store
    _, result = shard(tiny_llama, store_path, tmp_path, 2)
    scan = ScanSummary.from_json(result.scan)
    assert scan.problems() == [] and scan.samples == 3
    # Each row supervises the second half of its content (helpers.random_token_block); the shift keeps it whole.
    assert scan.supervised_positions == sum(length - length // 2 for length in LENGTHS[8:])
    assert 0 < scan.max_probability_sum_error <= scan.probability_sum_tolerance


def test_freeing_a_gpu_target_leaves_no_weight_on_the_device_and_ends_the_lease():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config())  # its own: the session's tiny_llama must keep its weights
    released = []
    pipeline.free_devices(model, torch.device("cuda"), lambda: released.append(True))
    assert released == [True]
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}
