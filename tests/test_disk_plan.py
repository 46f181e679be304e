"""The disk plan: its sizes against files the package's own writers make, its view of the filesystem, its verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from eagle3_cache import disk_plan, disk_space
from eagle3_cache.cache_dir import leftover_temp_files
from eagle3_cache.cache_rows import CacheBatch
from eagle3_cache.disk_plan import (
    Budget,
    Sizing,
    embeddings_cost,
    largest_fitting,
    plan_cache,
    plan_lines,
    refusal,
    shard_cost,
    specforge_shard_cost,
    split_by_shard,
    suggestions,
    target_hidden_size,
    vocab_mapping_cost,
)
from eagle3_cache.disk_space import Filesystem, keeps_holes, measure_filesystem, taken_bytes
from eagle3_cache.errors import CacheConfigError
from eagle3_cache.layout import EMBEDDINGS_FILE, VOCAB_MAPPING_FILE, shard_dir_name, shard_file_name
from eagle3_cache.pipeline import write_batch_rows
from eagle3_cache.shard_format import TORCH_DTYPES, ShardWriter, write_target_embeddings
from eagle3_cache.shard_layout import TOKEN_FIELDS, ShardLayout, embeddings_header, stored_safetensors_header
from eagle3_cache.specforge_format import sample_tensors, serialized, write_vocab_mapping
from eagle3_cache.specforge_shard import ShardDirectoryWriter
from eagle3_cache.specforge_sizes import bytes_per_token, sample_file_bytes
from eagle3_cache.units import format_bytes
from helpers import REPO, random_token_block, write_token_store

SEQ = 256
HIDDEN = 64
VOCAB = 500
# Content lengths of one shard's samples: a block's worth and less, a full row, one position.
LENGTHS = [100, 1, 37, SEQ, 3, 64, SEQ - 1]
SETTINGS = {
    "draft_vocab_size": None,
    "dtype": "bf16",
    "target_probs_topk": 0,
    "seq_length": SEQ,
    "shard_size": 4,
    "format": "automodel",
}
SPECFORGE_SETTINGS = {**SETTINGS, "format": "specforge"}
CHECK = {"margin": 0.05, "check_free_space": True}


def block_size(path) -> int:
    return os.statvfs(path).f_frsize


def random_batch(layout: ShardLayout, lengths: list[int]) -> CacheBatch:
    """Non-zero rows of every field at full width, as `compute_cache_batch` hands them to the writer."""
    generator = torch.Generator().manual_seed(0)
    fields = {}
    for field in layout.fields():
        dtype = TORCH_DTYPES[field.dtype]
        values = torch.rand((len(lengths), *field.sample_shape), generator=generator) + 1
        fields[field.name] = values.to(dtype)
    tokens = {name: fields.pop(name) for name in TOKEN_FIELDS}
    return CacheBatch(**tokens, computed=fields, lengths=torch.tensor(lengths))


def write_shard(path, layout: ShardLayout, lengths: list[int]) -> None:
    """A shard written the way a shard job writes it: `pipeline.write_batch_rows` into a `ShardWriter`."""
    with ShardWriter(path, layout, len(lengths)) as writer:
        write_batch_rows(writer, random_batch(layout, lengths), list(range(len(lengths))))
        writer.commit()


def write_specforge_shard(path, lengths: list[int], hidden_size: int = HIDDEN) -> list[dict]:
    """A shard directory written the way a specforge shard job writes it, through a `ShardDirectoryWriter`."""
    block = random_token_block(lengths, SEQ)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.rand((len(lengths), SEQ, 4 * hidden_size), generator=generator).to(torch.bfloat16)
    batch = CacheBatch(
        block.input_ids,
        block.attention_mask,
        block.loss_mask,
        {"final_hidden_state": hidden[..., :hidden_size], "aux_hidden_states": hidden[..., hidden_size:]},
        torch.tensor(lengths),
    )
    with ShardDirectoryWriter(path, block, 0) as writer:
        writer.write_batch(batch, list(range(len(lengths))))
        return writer.commit()


# --- Sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [0, 16])
def test_a_shard_takes_the_planned_bytes(tmp_path, topk):
    layout = ShardLayout.for_target(SEQ, HIDDEN, VOCAB, "bf16", topk)
    path = tmp_path / shard_file_name(0)
    write_shard(path, layout, LENGTHS)
    planned = shard_cost(0, layout, np.array(LENGTHS), block_size(tmp_path))
    allocated = path.stat().st_blocks * 512
    assert planned.apparent_bytes == path.stat().st_size
    assert planned.allocated_bytes < planned.apparent_bytes  # the padding is a hole
    # The filesystem may add a block of its own bookkeeping (ext4's extent tree) beyond the data.
    assert planned.allocated_bytes <= allocated <= planned.allocated_bytes + block_size(tmp_path)


def test_a_shard_without_padding_is_allocated_in_full(tmp_path):
    layout = ShardLayout.for_target(SEQ, HIDDEN, VOCAB, "fp32", 0)
    planned = shard_cost(0, layout, np.array([SEQ, SEQ]), block_size(tmp_path))
    assert planned.allocated_bytes == -(-planned.apparent_bytes // block_size(tmp_path)) * block_size(tmp_path)


def test_the_embeddings_file_is_planned_exactly(tmp_path):
    path = tmp_path / EMBEDDINGS_FILE
    write_target_embeddings(path, torch.randn(VOCAB, HIDDEN))
    planned = embeddings_cost(VOCAB, HIDDEN, block_size(tmp_path))
    assert planned.apparent_bytes == path.stat().st_size
    assert stored_safetensors_header(path) == embeddings_header(VOCAB, HIDDEN)[8:]
    assert planned.allocated_bytes == path.stat().st_blocks * 512


def test_a_specforge_shard_takes_the_planned_bytes(tmp_path):
    path = tmp_path / "shards" / shard_dir_name(0)
    records = write_specforge_shard(path, LENGTHS)
    files = sorted(path.iterdir())
    planned = specforge_shard_cost(0, np.array(LENGTHS), HIDDEN, block_size(tmp_path))
    assert planned.file == path.name
    assert planned.apparent_bytes == sum(f.stat().st_size for f in files) == sum(r["bytes"] for r in records)
    allocated = sum(f.stat().st_blocks * 512 for f in files)
    assert planned.allocated_bytes <= allocated <= planned.allocated_bytes + len(files) * block_size(tmp_path)


@pytest.mark.parametrize("hidden_size", [37, 64, 576, 4096])
def test_a_sample_file_s_size_is_its_tensors_and_the_zip_layout(hidden_size):
    lengths = [1, 2, 7, 8, 9, 85, 255, 256, 1000]
    planned = sample_file_bytes(np.array(lengths), hidden_size)
    for length, size in zip(lengths, planned, strict=True):
        hidden = torch.ones(length, 4 * hidden_size, dtype=torch.bfloat16)
        ids = torch.ones(length, dtype=torch.int64)
        sample = sample_tensors(ids, ids, hidden[:, :hidden_size], hidden[:, hidden_size:])
        tensor_bytes = {key: value.numel() * value.element_size() for key, value in sample.items()}
        assert tensor_bytes == {key: per_token * length for key, per_token in bytes_per_token(hidden_size).items()}
        assert size == len(serialized(sample)) == sample_file_bytes(length, hidden_size), length


@pytest.mark.parametrize(("draft", "target"), [(10, 500), (300, 300), (4096, 49152), (32000, 128256)])
def test_the_vocab_mapping_is_planned_exactly(tmp_path, draft, target):
    path = tmp_path / VOCAB_MAPPING_FILE
    write_vocab_mapping(path, torch.randperm(target)[:draft], target)
    planned = vocab_mapping_cost(draft, target, block_size(tmp_path))
    assert planned.apparent_bytes == path.stat().st_size
    assert planned.allocated_bytes == path.stat().st_blocks * 512


def test_a_shard_directory_already_there_frees_what_its_files_take(tmp_path):
    write_specforge_shard(tmp_path / shard_dir_name(0), [5, 9])
    taken = taken_bytes(tmp_path, [shard_dir_name(0), shard_dir_name(1)])
    assert taken == {shard_dir_name(0): sum(f.stat().st_blocks * 512 for f in (tmp_path / shard_dir_name(0)).iterdir())}


def test_a_file_already_there_frees_what_it_takes(tmp_path):
    lengths = split_by_shard(np.array(LENGTHS), 4)
    sizing = Sizing(lengths, VOCAB, HIDDEN, block_size(tmp_path))
    layout = sizing.layout(SEQ, None, "bf16", 0)
    cost = sizing.cost(layout)
    write_shard(tmp_path / shard_file_name(0), layout, list(lengths[0]))  # finished
    write_shard(tmp_path / shard_file_name(1), replace(layout, target_probs_topk=4), list(lengths[1]))  # smaller
    write_target_embeddings(tmp_path / EMBEDDINGS_FILE, torch.randn(VOCAB, HIDDEN))
    taken = taken_bytes(tmp_path, [f.file for f in cost.files])
    assert taken.keys() == {shard_file_name(0), shard_file_name(1), EMBEDDINGS_FILE}
    budget = Budget(sizing, measure_filesystem(tmp_path), taken, 0, 0.0)
    _, replaced, _ = cost.files
    assert budget.to_write(cost) == replaced.allocated_bytes - taken[shard_file_name(1)]


# --- The filesystem ------------------------------------------------------------------------------


def test_the_filesystem_is_measured_at_the_nearest_existing_directory(tmp_path):
    filesystem = measure_filesystem(tmp_path / "results" / "run" / "shards")
    assert filesystem.path == str(tmp_path)
    assert filesystem.block_size == block_size(tmp_path) and filesystem.free_bytes > 0
    assert keeps_holes(tmp_path, filesystem.block_size) == filesystem.sparse_files
    assert list(tmp_path.iterdir()) == []  # the probe is gone


def test_a_probe_a_killed_plan_job_left_is_a_temp_file_the_manifest_job_removes(tmp_path, monkeypatch):
    # SIGKILL skips the probe's own cleanup; here its unlink does nothing instead.
    monkeypatch.setattr(disk_space.os, "unlink", lambda path: None)
    keeps_holes(tmp_path, block_size(tmp_path))
    [probe] = tmp_path.iterdir()
    (tmp_path / "shard-000000.tmp").mkdir()  # a directory by that suffix is not one
    assert leftover_temp_files(tmp_path) == [probe]


def test_without_sparse_files_the_apparent_size_counts():
    sizing = Sizing(split_by_shard(np.array(LENGTHS), 4), VOCAB, HIDDEN, 4096)
    cost = sizing.cost(sizing.layout(SEQ, None, "bf16", 0))
    dense = Budget(sizing, Filesystem(".", 0, 4096, sparse_files=False), {}, 0, 0.0)
    sparse = replace(dense, filesystem=replace(dense.filesystem, sparse_files=True))
    assert dense.to_write(cost) == cost.apparent_bytes
    assert sparse.to_write(cost) == cost.allocated_bytes


# --- The verdict ---------------------------------------------------------------------------------


def test_largest_fitting_finds_the_boundary():
    assert largest_fitting(1, 100, lambda v: v <= 37) == 37
    assert largest_fitting(1, 100, lambda v: True) == 100
    assert largest_fitting(1, 100, lambda v: False) is None


def test_suggestions_name_settings_that_fit():
    sizing = Sizing(split_by_shard(np.array(LENGTHS * 3), 4), VOCAB, HIDDEN, 4096)
    layout = sizing.layout(SEQ, None, "bf16", 0)
    roomy = Budget(sizing, Filesystem(".", 10**12, 4096, True), {}, 1000, 0.05)
    topk_required = roomy.required(sizing.cost(replace(layout, target_probs_topk=64)))
    budget = replace(roomy, filesystem=replace(roomy.filesystem, free_bytes=topk_required))
    assert not budget.fits_layout(layout)
    found = suggestions("demo", "automodel", layout, budget)
    assert found[0].startswith("runs.demo.target_probs_topk: 64 (needs ")
    width = int(found[1].removeprefix("runs.demo.draft_vocab_size: ").removesuffix(" or less"))
    assert budget.fits_layout(replace(layout, draft_vocab_size=width))
    assert not budget.fits_layout(replace(layout, draft_vocab_size=width + 1))
    assert found[-1] == "plan.check_free_space: false to start anyway"
    # Neither setting shrinks a specforge cache: only another filesystem helps.
    specforge = suggestions(
        "demo", "specforge", layout, replace(budget, filesystem=replace(budget.filesystem, free_bytes=0))
    )
    assert [s.split(" ")[0] for s in specforge] == ["results/", "plan.check_free_space:"]


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "tokenized.h5"
    write_token_store(path, random_token_block(LENGTHS, SEQ), target_vocab_size=VOCAB)
    return path


def small_disk(free_bytes: int):
    """`measure_filesystem` replaced by a sparse filesystem with `free_bytes` free."""
    return lambda cache_dir: Filesystem(str(cache_dir), free_bytes, 4096, True)


def test_a_plan_beyond_the_free_space_is_refused_with_what_to_change(store, tmp_path, monkeypatch):
    monkeypatch.setattr(disk_plan, "measure_filesystem", small_disk(100_000))
    plan = plan_cache("demo", store, tmp_path / "shards", SETTINGS, CHECK, HIDDEN)
    assert not plan["fits"] and plan["required_bytes"] > 100_000
    message = refusal(plan)
    assert message.startswith("run 'demo': the cache needs ")
    assert "100 kB" in message and "runs.demo.target_probs_topk: 64" in message
    assert "plan.check_free_space: false" in message
    assert refusal({**plan, "check_free_space": False}) is None


def test_a_plan_within_the_free_space_passes_and_sizes_the_alternative(store, tmp_path):
    plan = plan_cache("demo", store, tmp_path / "shards", SETTINGS, CHECK, HIDDEN)
    assert plan["fits"] and refusal(plan) is None and "suggestions" not in plan
    assert plan["layout"]["aux_hidden_dim"] == 3 * HIDDEN and plan["layout"]["draft_vocab_size"] == VOCAB
    assert [f["file"] for f in plan["files"]] == [shard_file_name(0), shard_file_name(1), EMBEDDINGS_FILE]
    assert plan["alternative"] == {**plan["alternative"], "format": "automodel", "target_probs_topk": 64}
    assert plan["alternative"]["allocated_bytes"] < plan["allocated_bytes"]
    assert plan["specforge"]["allocated_bytes"] < plan["allocated_bytes"]
    json.dumps(plan)


def test_a_specforge_plan_sizes_its_shard_directories_and_compares_the_automodel_format(store, tmp_path):
    plan = plan_cache("demo", store, tmp_path / "shards", SPECFORGE_SETTINGS, CHECK, HIDDEN)
    automodel = plan_cache("demo", store, tmp_path / "shards", SETTINGS, CHECK, HIDDEN)
    assert plan["format"] == "specforge" and plan["fits"]
    assert [f["file"] for f in plan["files"]] == [shard_dir_name(0), shard_dir_name(1), VOCAB_MAPPING_FILE]
    lengths = split_by_shard(np.array(LENGTHS), SETTINGS["shard_size"])
    assert plan["files"][0]["apparent_bytes"] == int(sample_file_bytes(lengths[0], HIDDEN).sum())
    assert plan["apparent_bytes"] == automodel["specforge"]["apparent_bytes"]
    assert plan["alternative"] == {
        "format": "automodel",
        "target_probs_topk": 0,
        "apparent_bytes": automodel["apparent_bytes"],
        "allocated_bytes": automodel["allocated_bytes"],
    }
    assert "specforge" not in plan
    assert plan["manifest_bytes_bound"] > automodel["manifest_bytes_bound"]  # a record per sample file
    assert plan_lines(plan)[2].startswith("in the automodel format with full target_probs instead: ")


def test_a_specforge_plan_beyond_the_free_space_suggests_only_another_disk(store, tmp_path, monkeypatch):
    monkeypatch.setattr(disk_plan, "measure_filesystem", small_disk(1000))
    plan = plan_cache("demo", store, tmp_path / "shards", SPECFORGE_SETTINGS, CHECK, HIDDEN)
    assert not plan["fits"]
    assert plan["suggestions"] == [
        f"results/ on a filesystem with {format_bytes(plan['required_bytes'])} free",
        "plan.check_free_space: false to start anyway",
    ]
    assert "target_probs_topk" not in refusal(plan) and "draft_vocab_size" not in refusal(plan)


# --- The target's width ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_type": "llama", "hidden_size": 48}, 48),
        ({"model_type": "llava", "hidden_size": 7, "text_config": {"hidden_size": 40}}, 40),
        ({"model_type": "gpt2", "n_embd": 24}, 24),  # an alias only transformers knows
    ],
)
def test_the_hidden_size_comes_from_config_json(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert target_hidden_size(str(tmp_path), None, False) == expected


def test_a_hub_target_s_config_comes_from_the_hub_cache_at_its_revision(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 56}))
    asked = []

    def download(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert target_hidden_size("example-org/example-model", "abc123", False) == 56
    assert asked == [("example-org/example-model", "config.json", "abc123")]


def test_an_unreadable_config_names_the_target(tmp_path):
    with pytest.raises(CacheConfigError, match=r"target_model '.*' \(revision None\): cannot read its config.json"):
        target_hidden_size(str(tmp_path), None, False)


def test_the_plan_job_imports_no_torch():
    code = (
        "import sys\n"
        "import eagle3_cache.disk_plan, eagle3_cache.atomic, eagle3_cache.logs\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "workflow" / "scripts")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
