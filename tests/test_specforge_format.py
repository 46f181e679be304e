"""The specforge output format: the hidden-state rows, the per-sample files, the vocabulary mapping, the checker."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from eagle3_cache.cache_rows import CacheSpec, compute_cache_batch
from eagle3_cache.errors import CacheConfigError
from eagle3_cache.layout import EMBEDDINGS_FILE, MANIFEST_FILE, VOCAB_MAPPING_FILE, shard_dir_name, shard_file_name
from eagle3_cache.pipeline import ShardJob
from eagle3_cache.provenance import SHARD_SETTING_KEYS, settings_fingerprint
from eagle3_cache.shard_layout import ShardLayout
from eagle3_cache.specforge_cache import manifest_format, remove_specforge_files
from eagle3_cache.specforge_format import (
    lm_head_key,
    nonfinite_values,
    read_sample_file,
    sample_problems,
    sample_tensors,
    serialized,
    write_vocab_mapping,
    write_weight_index,
)
from eagle3_cache.specforge_layout import (
    WEIGHT_INDEX_FILE,
    sample_file_name,
    staging_dir_for,
    target_dir_problems,
    vocab_mapping,
)
from eagle3_cache.specforge_shard import compute_specforge_shard
from eagle3_cache.specforge_verification import check_specforge_cache
from eagle3_cache.target import resolve_aux_layer_ids
from eagle3_cache.token_store import TokenBlock
from helpers import (
    PARITY_ROWS,
    build_tiny_cache,
    fail_second_forward,
    random_token_block,
    tiny_llama_config,
    write_token_store,
)

SEQ = 20
LENGTHS = [7, SEQ, 3, 12, 12, 1, 18, 9, 5, 16, 2]  # 11 samples: shards of 4, 4 and a partial 3


def spec_for(model, target_repr="hidden_state", dtype="bf16") -> CacheSpec:
    selected = torch.arange(0, model.config.vocab_size, 3)
    return CacheSpec(resolve_aux_layer_ids(model, None), selected, model.config.vocab_size, dtype, 0, target_repr)


@pytest.fixture()
def store(tmp_path):
    block = random_token_block(LENGTHS, SEQ, seed=11)
    path = tmp_path / "tokenized.h5"
    write_token_store(path, block)
    return path, block


def specforge_shard(model, store_path, cache_dir, index, batch_size=3, **overrides):
    spec = spec_for(model, target_repr="distribution", **overrides)
    layout = ShardLayout(SEQ, 3 * model.config.hidden_size, spec.draft_vocab_size, spec.dtype, 0)
    path = cache_dir / shard_dir_name(index)
    result = compute_specforge_shard(
        model, spec, layout, ShardJob(store_path, len(LENGTHS), index, 4, batch_size, path)
    )
    return path, result


# --- The computation -----------------------------------------------------------------------------


def test_hidden_state_rows_are_the_post_norm_decoder_output_and_the_aux_layers(tiny_llama):
    tokens = random_token_block([SEQ, 9, 1], SEQ, seed=4)
    fp32 = spec_for(tiny_llama, dtype="fp32")
    ours = compute_cache_batch(tiny_llama, fp32, tokens).cpu()
    assert ours.computed.keys() == {"aux_hidden_states", "final_hidden_state"}
    with torch.no_grad():
        out = tiny_llama(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    distribution = compute_cache_batch(tiny_llama, spec_for(tiny_llama, "distribution", "fp32"), tokens).cpu()
    for row, length in enumerate([SEQ, 9, 1]):
        final = ours.computed["final_hidden_state"][row, :length]
        # What lm_head multiplies: the logits come back from it exactly.
        torch.testing.assert_close(tiny_llama.lm_head(final), out.logits[row, :length], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final, out.hidden_states[-1][row, :length], atol=1e-5, rtol=1e-5)
        aux = ours.computed["aux_hidden_states"][row, :length]
        assert torch.equal(aux, distribution.computed["aux_hidden_states"][row, :length])


def test_hidden_state_forward_stops_at_the_longest_row(tiny_llama):
    tokens = random_token_block([9, 4], SEQ, seed=4)
    batch = compute_cache_batch(tiny_llama, spec_for(tiny_llama), tokens)
    assert batch.computed["final_hidden_state"].shape[1] == 9
    assert batch.computed["final_hidden_state"].dtype == torch.bfloat16


# --- Shard directories ---------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 2])
def test_shard_files_hold_each_samples_real_positions(tiny_llama, store, tmp_path, index):
    store_path, block = store
    path, result = specforge_shard(tiny_llama, store_path, tmp_path / "shards", index)
    first, count = index * 4, min(4, len(LENGTHS) - index * 4)
    names = [sample_file_name(first + offset) for offset in range(count)]
    assert sorted(p.name for p in path.iterdir()) == names
    assert [f["file"] for f in result.files] == names
    assert not staging_dir_for(path).exists()
    spec = spec_for(tiny_llama)
    for offset, name in enumerate(names):
        row, length = first + offset, LENGTHS[first + offset]
        stored = read_sample_file(path / name)
        assert sample_problems(stored, num_tokens=length, hidden_size=32) == []
        assert torch.equal(stored["input_ids"], block.input_ids[row, :length])
        assert torch.equal(stored["loss_mask"], block.loss_mask[row, :length])
        alone = TokenBlock(*(t[row : row + 1] for t in (block.input_ids, block.attention_mask, block.loss_mask)))
        expected = compute_cache_batch(tiny_llama, spec, alone).cpu().computed
        for key, name_in_batch in (("hidden_state", "final_hidden_state"), ("aux_hidden_state", "aux_hidden_states")):
            torch.testing.assert_close(
                stored[key][0].float(), expected[name_in_batch][0, :length].float(), atol=1e-2, rtol=1e-2
            )
        # Each file holds its own tensors only (a saved view would drag its whole batch along).
        assert (path / name).stat().st_size == len(serialized(stored))
    assert result.bytes == sum((path / name).stat().st_size for name in names)
    assert result.real_tokens == sum(LENGTHS[first : first + count])
    assert result.lm_head_key == "lm_head.weight" and result.hidden_size == 32


def test_the_same_shard_twice_is_byte_identical(tiny_llama, store, tmp_path):
    store_path, _ = store
    first, _ = specforge_shard(tiny_llama, store_path, tmp_path / "a", 1)
    second, _ = specforge_shard(tiny_llama, store_path, tmp_path / "b", 1)
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
    for path in first.iterdir():
        assert path.read_bytes() == (second / path.name).read_bytes(), path.name


def test_a_failing_forward_leaves_no_shard_directory(tiny_llama, store, tmp_path, monkeypatch):
    store_path, _ = store
    fail_second_forward(monkeypatch)
    with pytest.raises(RuntimeError, match="out of memory"):
        specforge_shard(tiny_llama, store_path, tmp_path / "shards", 0, batch_size=1)
    assert not (tmp_path / "shards" / shard_dir_name(0)).exists()
    assert not staging_dir_for(tmp_path / "shards" / shard_dir_name(0)).exists()


def test_only_bf16_is_written(tiny_llama, store, tmp_path):
    with pytest.raises(CacheConfigError, match="dtype: bf16"):
        specforge_shard(tiny_llama, store[0], tmp_path / "shards", 0, dtype="fp32")


def test_sample_checks_name_what_is_wrong():
    good = sample_tensors(
        torch.arange(5),
        torch.tensor([0, 0, 1, 1, 1]),
        torch.zeros(5, 4, dtype=torch.bfloat16),
        torch.zeros(5, 12, dtype=torch.bfloat16),
    )
    assert sample_problems(good, num_tokens=5, hidden_size=4) == []
    assert good["hidden_state"].shape == (1, 5, 4) and good["input_ids"].dtype == torch.int64
    assert sample_problems(good, num_tokens=6, hidden_size=4)[0].startswith("input_ids: stored torch.int64 [5]")
    bad = {**good, "hidden_state": good["hidden_state"].float(), "loss_mask": torch.full((5,), 2)}
    del bad["aux_hidden_state"]
    problems = sample_problems(bad, num_tokens=5, hidden_size=4)
    assert "missing key 'aux_hidden_state'" in problems
    assert any(p.startswith("hidden_state: stored torch.float32") for p in problems)
    assert "loss_mask holds values other than 0 and 1" in problems
    nan = {**good, "aux_hidden_state": good["aux_hidden_state"].clone()}
    nan["aux_hidden_state"][0, 1, :3] = float("nan")
    nan["aux_hidden_state"][0, 2, 0] = float("inf")
    assert nonfinite_values(nan) == {"hidden_state": 0, "aux_hidden_state": 4}


def test_an_unreadable_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / sample_file_name(3)
    path.write_bytes(b"not a zip file")
    with pytest.raises(CacheConfigError, match="sample-000000003.ckpt"):
        read_sample_file(path)


def test_sample_file_names_sort_in_sample_order():
    names = [f"{shard_dir_name(i // 4)}/{sample_file_name(i)}" for i in (0, 3, 4, 9, 10, 11, 100)]
    assert sorted(names) == names
    with pytest.raises(CacheConfigError, match="fewer than"):
        sample_file_name(10**9)


# --- The vocabulary mapping ----------------------------------------------------------------------


def test_vocab_mapping_d2t_arithmetic_gives_back_our_selected_ids(tmp_path):
    selected = torch.tensor([2, 1, 40, 7, 3, 99, 0])  # specials first, then by frequency: not sorted
    path = tmp_path / VOCAB_MAPPING_FILE
    write_vocab_mapping(path, selected, 100)
    saved = torch.load(path, weights_only=True)
    assert saved["d2t"].dtype == torch.int64 and saved["t2d"].dtype == torch.bool
    assert saved["d2t"].shape == (7,) and saved["t2d"].shape == (100,)
    target_ids = torch.arange(7) + saved["d2t"]
    assert target_ids.tolist() == sorted(selected.tolist())
    assert torch.nonzero(saved["t2d"]).flatten().tolist() == target_ids.tolist()
    with pytest.raises(CacheConfigError, match="select_vocab"):
        vocab_mapping(torch.tensor([1, 1, 2]), 100)


# --- The target directory ------------------------------------------------------------------------


def test_lm_head_key_is_the_embedding_for_a_tied_model(tiny_llama):
    from transformers import LlamaForCausalLM

    assert lm_head_key(tiny_llama) == "lm_head.weight"
    tied = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert lm_head_key(tied) == "model.embed_tokens.weight"


def test_weight_index_lets_specforge_find_the_head_and_transformers_still_loads(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path)
    assert target_dir_problems(tmp_path, "model.embed_tokens.weight")[0].endswith("write_weight_index)")
    write_weight_index(tmp_path)
    index = json.loads((tmp_path / WEIGHT_INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert target_dir_problems(tmp_path, "model.embed_tokens.weight") == []
    assert "no 'lm_head.weight'" in target_dir_problems(tmp_path, "lm_head.weight")[0]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


# --- The cache directory -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def specforge_cache(tmp_path_factory, tiny_chat_target):
    """A finished specforge run on the parity conversations: 6 samples in shards of 4 and 2."""
    return build_tiny_cache(
        tmp_path_factory.mktemp("specforge") / "run", tiny_chat_target, PARITY_ROWS, shard_size=4, format="specforge"
    )


@pytest.fixture()
def cache_copy(specforge_cache, tmp_path):
    return shutil.copytree(specforge_cache.cache_dir, tmp_path / "shards")


def test_a_finished_cache_is_intact_and_its_manifest_records_every_file(specforge_cache):
    cache_dir = specforge_cache.cache_dir
    assert check_specforge_cache(cache_dir) == []
    assert manifest_format(cache_dir) == "specforge"
    assert sorted(p.name for p in cache_dir.iterdir()) == [MANIFEST_FILE, "shard-000000", "shard-000001"] + [
        VOCAB_MAPPING_FILE
    ]
    manifest = json.loads((cache_dir / MANIFEST_FILE).read_text())
    assert manifest["format"] == "specforge" and "format_version" not in manifest
    assert manifest["lm_head_key"] == "lm_head.weight" and manifest["hidden_size"] == 32
    assert manifest["num_files"] == len(PARITY_ROWS)
    assert [(s["directory"], s["num_files"]) for s in manifest["shards"]] == [("shard-000000", 4), ("shard-000001", 2)]
    assert all(len(f["digest"]) == 64 for s in manifest["shards"] for f in s["files"])


def test_the_checker_names_each_damaged_file(cache_copy):
    shard = cache_copy / "shard-000001"
    (shard / sample_file_name(4)).write_bytes(b"damaged")
    (shard / sample_file_name(5)).unlink()
    (cache_copy / "shard-000000" / "notes.txt").write_text("x")
    (cache_copy / "shard-000001.tmp").mkdir()
    problems = {str(p) for p in check_specforge_cache(cache_copy)}
    assert problems == {
        "shard-000001/sample-000000004.ckpt: 7 bytes, its shard job wrote "
        + str(json.loads((cache_copy / MANIFEST_FILE).read_text())["shards"][1]["files"][0]["bytes"])
        + " (truncated or overwritten?)",
        "shard-000001/sample-000000005.ckpt: missing",
        "shard-000000/notes.txt: stray file",
        "shard-000001.tmp: stray file or directory (SpecForge may read it)",
    }


def test_the_checker_finds_a_replaced_file_and_mapping(cache_copy, specforge_cache):
    victim = cache_copy / "shard-000000" / sample_file_name(1)
    sample = read_sample_file(victim)
    sample["hidden_state"] = sample["hidden_state"].clone()
    sample["hidden_state"][0, 0, 0] += 1
    victim.write_bytes(serialized(sample))
    write_vocab_mapping(cache_copy / VOCAB_MAPPING_FILE, torch.arange(64), 370)
    problems = [str(p) for p in check_specforge_cache(cache_copy)]
    assert problems[0] == (
        "shard-000000/sample-000000001.ckpt: digest differs from the one recorded when it was written (changed on disk)"
    )
    assert problems[1].startswith("vocab_mapping.pt: d2t differs from the manifest's selected_token_ids")
    assert problems[-1] == "vocab_mapping.pt: sha256 differs from the manifest (corrupted or replaced)"


def test_switching_back_to_automodel_removes_the_specforge_files(cache_copy):
    (cache_copy.parent / "shards.staging" / "shard-000003").mkdir(parents=True)
    remove_specforge_files(cache_copy)
    assert sorted(p.name for p in cache_copy.iterdir()) == [MANIFEST_FILE]
    assert not (cache_copy.parent / "shards.staging").exists()
    (cache_copy / MANIFEST_FILE).write_text("{}")
    assert manifest_format(cache_copy) == "automodel"
    (cache_copy / MANIFEST_FILE).unlink()
    assert manifest_format(cache_copy) == "automodel"


def test_the_specforge_manifest_removes_the_automodel_files(tiny_chat_target, tmp_path):
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    for name in (shard_file_name(0), shard_file_name(7), EMBEDDINGS_FILE):
        (run / "shards" / name).write_bytes(b"old")
    cache = build_tiny_cache(run, tiny_chat_target, PARITY_ROWS[:3], shard_size=4, format="specforge")
    assert sorted(p.name for p in cache.cache_dir.iterdir()) == [MANIFEST_FILE, "shard-000000", VOCAB_MAPPING_FILE]
    assert check_specforge_cache(cache.cache_dir) == []


def test_an_unknown_target_repr_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="target_repr must be one of"):
        spec_for(tiny_llama, target_repr="logits")


def test_shards_of_the_other_format_are_caught_by_the_settings_fingerprint():
    settings = dict.fromkeys(SHARD_SETTING_KEYS, 0)
    automodel, specforge = ({**settings, "format": name} for name in ("automodel", "specforge"))
    assert settings_fingerprint(automodel) != settings_fingerprint(specforge)
