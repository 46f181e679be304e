"""Loading the target: its device, its decoder layers and aux layer ids, and what identifies its weights."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from eagle3_cache.errors import CacheConfigError
from eagle3_cache.target import decoder_layers, default_aux_layer_ids, resolve_aux_layer_ids, resolve_device


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


def test_unknown_device_is_refused():
    with pytest.raises(CacheConfigError, match="device"):
        resolve_device("tpu")
    assert resolve_device("cpu").type == "cpu"
