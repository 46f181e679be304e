"""Loading the target: its device, its decoder layers and aux layer ids, and what identifies its weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from eagle3_cache.errors import CacheConfigError
from eagle3_cache.preflight import default_aux_layer_ids
from eagle3_cache.target import (
    compute_dtype,
    cpu_flags,
    decoder_layers,
    emulated_cpu_dtype_warning,
    local_checkpoint_fingerprint,
    model_identity,
    resolve_aux_layer_ids,
    resolve_device,
)
from helpers import tiny_llama_config


def test_default_aux_layers_follow_the_eagle3_recipe(tiny_llama):
    assert default_aux_layer_ids(30) == [1, 14, 26]
    assert resolve_aux_layer_ids(tiny_llama, None) == default_aux_layer_ids(8) == [1, 3, 4]


@pytest.mark.parametrize("ids", [[1, 2], [1, 2, 3, 4], [1, 1, 2], [0, 2, 8], [-1, 2, 3]])
def test_bad_aux_layer_ids_are_refused_with_the_fix(tiny_llama, ids):
    with pytest.raises(CacheConfigError, match="aux_layer_ids"):
        resolve_aux_layer_ids(tiny_llama, ids)


def test_a_model_too_shallow_for_the_default_recipe_asks_for_explicit_ids():
    from transformers import LlamaForCausalLM

    shallow = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4))
    with pytest.raises(CacheConfigError, match="aux_layer_ids"):
        resolve_aux_layer_ids(shallow, None)
    assert resolve_aux_layer_ids(shallow, [0, 1, 3]) == [0, 1, 3]


def test_a_model_without_known_layers_is_refused():
    with pytest.raises(CacheConfigError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_compute_dtype_auto_follows_the_device_and_a_named_dtype_applies_everywhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (compute_dtype(cpu), compute_dtype(cuda)) == (torch.float32, torch.bfloat16)
    assert {compute_dtype(device, "bf16") for device in (cpu, cuda)} == {torch.bfloat16}
    assert compute_dtype(cuda, "fp32") == torch.float32 and compute_dtype(cpu, "fp16") == torch.float16


def test_bf16_compute_on_a_cpu_without_native_bf16_is_warned_of(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512bw\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    flags = cpu_flags(cpuinfo)
    assert flags == {"fpu", "avx512f", "avx512bw"}
    warning = emulated_cpu_dtype_warning(torch.bfloat16, flags)
    assert "amx_bf16 or avx512_bf16" in warning and "compute_dtype: auto" in warning
    assert emulated_cpu_dtype_warning(torch.bfloat16, flags | {"amx_bf16"}) is None
    assert emulated_cpu_dtype_warning(torch.float32, flags) is None
    # Flags that cannot be read (not Linux) say nothing either way.
    assert cpu_flags(tmp_path / "missing") == set() and emulated_cpu_dtype_warning(torch.bfloat16, set()) is None


def test_unknown_device_is_refused():
    with pytest.raises(CacheConfigError, match="device"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"


def test_a_local_checkpoint_fingerprint_covers_config_and_tensor_layout_but_not_values(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 6}')
    save_file({"weight": torch.zeros(2, 3)}, tmp_path / "model.safetensors")
    first = local_checkpoint_fingerprint(tmp_path)
    save_file({"weight": torch.ones(2, 3)}, tmp_path / "model.safetensors")
    assert local_checkpoint_fingerprint(tmp_path) == first, "documented: weight values are not hashed"
    size = (tmp_path / "model.safetensors").stat().st_size
    save_file({"weight": torch.zeros(3, 2)}, tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").stat().st_size == size
    reshaped = local_checkpoint_fingerprint(tmp_path)
    assert reshaped != first, "same names and sizes, other shapes"
    (tmp_path / "config.json").write_text('{"hidden_size": 2}')
    assert local_checkpoint_fingerprint(tmp_path) != reshaped


def test_a_local_target_is_identified_by_its_fingerprint_and_a_hub_target_by_its_commit(tiny_llama, tiny_llama_dir):
    local = model_identity(str(tiny_llama_dir), None, tiny_llama)
    assert local["weight_files_sha256"] == local_checkpoint_fingerprint(tiny_llama_dir)
    hub = model_identity("org/not-a-local-dir", "main", tiny_llama)
    assert "weight_files_sha256" not in hub and hub["config_sha256"] == local["config_sha256"]


def test_a_checkpoint_missing_a_tensor_is_refused_once_loaded(tiny_chat_target, tmp_path):
    """What a hub checkpoint gets after download: a tensor transformers would initialise at random is named."""
    import shutil

    from safetensors.torch import load_file

    from eagle3_cache.target import load_target

    model = shutil.copytree(tiny_chat_target, tmp_path / "model")
    weights = load_file(model / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CacheConfigError, match=r"lacks 1 tensor\(s\) the model needs \(model\.layers\.1\.mlp\.down_proj"
    ):
        load_target(str(model), revision=None, trust_remote_code=False, device=torch.device("cpu"))
    load_target(str(tiny_chat_target), revision=None, trust_remote_code=False, device=torch.device("cpu"))
