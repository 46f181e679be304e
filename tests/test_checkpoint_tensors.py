"""The embedding table read from the checkpoint's safetensors files is byte for byte what the built model holds."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from eagle3_cache.checkpoint_tensors import NotReadableDirectly, read_input_embeddings
from eagle3_cache.target import input_embeddings
from helpers import tiny_llama_config


def built_model_table(path, revision=None):
    """What the embeddings rule stored before: the table of the model built with dtype="auto"."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype="auto")
    return model.get_input_embeddings().weight.detach().to(torch.float32).contiguous()


def save_tiny(path, *, tied, dtype=torch.float32, max_shard_size=None, seed=0, base_only=False):
    """A random tiny Llama saved with save_pretrained; sharded with an index when max_shard_size is given."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).to(dtype)
    saved = model.model if base_only else model
    saved.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path


def assert_same_bytes(actual, expected):
    assert actual.dtype == expected.dtype == torch.float32 and actual.shape == expected.shape
    assert actual.numpy().tobytes() == expected.numpy().tobytes()


@pytest.fixture
def no_model_building(monkeypatch):
    """Fail any attempt to build the model from its weights."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("max_shard_size", [None, "20KB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_table_read_directly_is_the_built_models(tmp_path, tied, max_shard_size, dtype):
    path = save_tiny(tmp_path / "model", tied=tied, dtype=dtype, max_shard_size=max_shard_size)
    assert (path / "model.safetensors.index.json").is_file() == bool(max_shard_size)
    expected = built_model_table(path)
    assert_same_bytes(read_input_embeddings(str(path), revision=None, trust_remote_code=False), expected)


def test_the_rule_reads_the_table_without_building_the_model(tmp_path, no_model_building, caplog):
    path = save_tiny(tmp_path / "model", tied=True, max_shard_size="20KB")
    with caplog.at_level(logging.INFO, logger="eagle3_cache"):
        table = input_embeddings(str(path), revision=None, trust_remote_code=False)
    assert table.shape == (128, 32)
    assert "read model.embed_tokens.weight from model-0000" in caplog.text


def test_the_configs_dtype_rounds_the_table_as_loading_does(tmp_path):
    path = save_tiny(tmp_path / "model", tied=False)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    table = read_input_embeddings(str(path), revision=None, trust_remote_code=False)
    assert_same_bytes(table, built_model_table(path))
    assert torch.equal(table, table.to(torch.bfloat16).float())


def test_a_base_model_checkpoint_is_renamed_as_the_loader_renames_it(tmp_path, no_model_building):
    path = save_tiny(tmp_path / "model", tied=False, base_only=True)
    from safetensors.torch import load_file

    stored = load_file(path / "model.safetensors")
    assert "embed_tokens.weight" in stored and "model.embed_tokens.weight" not in stored
    table = read_input_embeddings(str(path), revision=None, trust_remote_code=False)
    assert torch.equal(table, stored["embed_tokens.weight"])


def test_a_checkpoint_without_safetensors_builds_the_model_and_says_so(tmp_path, caplog):
    path = save_tiny(tmp_path / "model", tied=False)
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(NotReadableDirectly, match="neither model.safetensors.index.json nor model.safetensors"):
        read_input_embeddings(str(path), revision=None, trust_remote_code=False)
    with caplog.at_level(logging.INFO, logger="eagle3_cache"):
        table = input_embeddings(str(path), revision=None, trust_remote_code=False)
    assert "building" in caplog.text and "neither" in caplog.text
    assert_same_bytes(table, built_model_table(path))


def fake_hub_snapshot(cache, repo_id, revision, commit, source):
    """`source`'s files as the hub cache holds a downloaded revision of `repo_id`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())


def test_a_hub_target_is_read_from_the_hub_cache_at_its_revision(tmp_path, monkeypatch, no_model_building):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    models = {}
    for revision, commit, seed in (("main", "a" * 40, 0), ("v2", "b" * 40, 1)):
        source = save_tiny(tmp_path / revision, tied=True, max_shard_size="20KB", seed=seed)
        fake_hub_snapshot(cache, "org/tiny", revision, commit, source)
        models[revision] = read_input_embeddings(str(source), revision=None, trust_remote_code=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for revision, expected in models.items():
        assert_same_bytes(read_input_embeddings("org/tiny", revision=revision, trust_remote_code=False), expected)
    assert not torch.equal(models["main"], models["v2"])
