"""The streamed shard writer, its atomicity, and the cache checker."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eagle3_cache.atomic import atomic_directory, torch_save_atomic, write_json_atomic
from eagle3_cache.cache_dir import FORMAT_VERSION, check_cache
from eagle3_cache.layout import EMBEDDINGS_FILE, num_shards, samples_in_shard, shard_file_name
from eagle3_cache.shard_format import TORCH_DTYPES, ShardWriter, read_shard_rows, write_target_embeddings
from eagle3_cache.shard_layout import ShardLayout

LAYOUT = ShardLayout(seq_length=6, aux_hidden_dim=9, draft_vocab_size=5, dtype="bf16", target_probs_topk=0)


def random_rows(layout: ShardLayout, n: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for field in layout.fields():
        dtype = TORCH_DTYPES[field.dtype]
        if dtype.is_floating_point:
            rows[field.name] = torch.rand((n, *field.sample_shape), generator=generator).to(dtype)
        elif dtype == torch.bool:
            rows[field.name] = torch.rand((n, *field.sample_shape), generator=generator) > 0.5
        else:
            rows[field.name] = torch.randint(0, 5, (n, *field.sample_shape), generator=generator, dtype=dtype)
    return rows


def test_rows_written_in_any_order_read_back_exactly(tmp_path):
    rows = random_rows(LAYOUT, 3)
    path = tmp_path / shard_file_name(0)
    with ShardWriter(path, LAYOUT, 3) as writer:
        for sample in (2, 0, 1):
            for name, values in rows.items():
                writer.write_row(sample, name, values[sample])
        digest = writer.commit()
    loaded = load_file(path)
    assert loaded.keys() == rows.keys()
    for name in rows:
        assert torch.equal(loaded[name], rows[name]), name
    assert len(digest) == 64 and path.stat().st_size == writer.size


def test_unwritten_positions_read_as_zeros(tmp_path):
    path = tmp_path / shard_file_name(0)
    aux = torch.ones((2, 9), dtype=torch.bfloat16)
    with ShardWriter(path, LAYOUT, 1) as writer:
        writer.write_row(0, "aux_hidden_states", aux)
        writer.commit()
    stored = read_shard_rows(path, [0])["aux_hidden_states"][0]
    assert torch.equal(stored[:2], aux) and not stored[2:].any()


def test_topk_layout_has_values_and_int32_indices(tmp_path):
    layout = ShardLayout(6, 9, draft_vocab_size=50, dtype="fp16", target_probs_topk=4)
    path = tmp_path / shard_file_name(0)
    with ShardWriter(path, layout, 2) as writer:
        writer.commit()
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {
            "input_ids",
            "attention_mask",
            "loss_mask",
            "aux_hidden_states",
            "position_mask",
            "target_probs_values",
            "target_probs_indices",
        }
        assert handle.get_slice("target_probs_indices").get_dtype() == "I32"
        assert handle.get_slice("target_probs_values").get_shape() == [2, 6, 4]


def test_a_failure_mid_write_leaves_no_file_under_the_final_name(tmp_path):
    path = tmp_path / shard_file_name(0)
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(path, LAYOUT, 2) as writer:
            writer.write_row(0, "input_ids", torch.zeros(6, dtype=torch.int64))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_row_of_the_wrong_dtype_is_refused(tmp_path):
    with ShardWriter(tmp_path / shard_file_name(0), LAYOUT, 1) as writer:
        with pytest.raises(ValueError, match="aux_hidden_states"):
            writer.write_row(0, "aux_hidden_states", torch.zeros((6, 9), dtype=torch.float32))
        writer.commit()


@pytest.fixture
def group_writable_umask():
    """umask 002 instead of the usual 022, so that a mode the code fixes itself shows."""
    previous = os.umask(0o002)
    yield
    os.umask(previous)


def test_every_atomic_write_leaves_the_umask_mode(tmp_path, group_writable_umask):
    with ShardWriter(tmp_path / shard_file_name(0), LAYOUT, 1) as writer:
        writer.commit()
    write_target_embeddings(tmp_path / EMBEDDINGS_FILE, torch.zeros(7, 3))
    write_json_atomic(tmp_path / "stats.json", {})
    torch_save_atomic(tmp_path / "selection.pt", {})
    with atomic_directory(tmp_path / "model") as staging:
        save_file({"weight": torch.zeros(2)}, str(staging / "model.safetensors"))
    written = [shard_file_name(0), EMBEDDINGS_FILE, "stats.json", "selection.pt", "model/model.safetensors"]
    assert {name: oct(stat.S_IMODE((tmp_path / name).stat().st_mode)) for name in written} == dict.fromkeys(
        written, oct(0o664)
    )


@pytest.mark.parametrize(("n", "size", "counts"), [(10, 4, [4, 4, 2]), (8, 4, [4, 4]), (3, 8, [3])])
def test_every_shard_is_full_except_the_last(n, size, counts):
    assert [samples_in_shard(i, n, size) for i in range(num_shards(n, size))] == counts


def write_cache(cache_dir, num_samples=5, shard_size=2):
    """A small but complete cache, written with the package's own writer."""
    cache_dir.mkdir()
    records = []
    for index in range(num_shards(num_samples, shard_size)):
        count = samples_in_shard(index, num_samples, shard_size)
        rows = random_rows(LAYOUT, count)
        with ShardWriter(cache_dir / shard_file_name(index), LAYOUT, count) as writer:
            for sample in range(count):
                for name, values in rows.items():
                    writer.write_row(sample, name, values[sample])
            digest = writer.commit()
        records.append({"file": shard_file_name(index), "num_samples": count, "bytes": writer.size, "digest": digest})
    write_target_embeddings(cache_dir / "target_embeddings.safetensors", torch.zeros(7, 3))
    manifest = {
        "format_version": FORMAT_VERSION,
        "target_model": "tiny",
        "target_vocab_size": 7,
        "draft_vocab_size": 5,
        "seq_length": 6,
        "dtype": "bf16",
        "num_samples": num_samples,
        "shard_size": shard_size,
        "target_probs_topk": 0,
        "aux_hidden_dim": 9,
        "aux_layer_ids": [0, 1, 2],
        "selected_token_ids": [0, 1, 2, 3, 4],
        "input_data": "x.jsonl",
        "split": None,
        "shuffle_seed": 42,
        "mask_reasoning_content": False,
        "mask_generation_prompt": False,
        "shards": records,
    }
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_a_complete_cache_has_no_problems(tmp_path):
    write_cache(tmp_path / "cache")
    assert check_cache(tmp_path / "cache") == []


def test_the_checker_names_each_kind_of_damage(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache)
    shard = cache / shard_file_name(1)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    (cache / shard_file_name(2)).unlink()
    (cache / (shard_file_name(0) + ".tmp")).write_bytes(b"partial")
    (cache / shard_file_name(7)).write_bytes(b"stale")
    problems = {str(p) for p in check_cache(cache)}
    assert f"{shard_file_name(1)}: digest differs from the manifest (corrupted or replaced)" in problems
    assert f"{shard_file_name(2)}: missing" in problems
    assert f"{shard_file_name(0)}.tmp: stray or temporary file" in problems
    assert f"{shard_file_name(7)}: not in the manifest (stale?)" in problems


def test_a_missing_manifest_means_incomplete(tmp_path):
    write_cache(tmp_path / "cache")
    (tmp_path / "cache" / "manifest.json").unlink()
    assert "incomplete" in str(check_cache(tmp_path / "cache")[0])
