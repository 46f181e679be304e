"""The packing probe: packed conversations see exactly what they would see alone."""

from __future__ import annotations

import torch

from eagle3_cache.cache_rows import CacheSpec
from eagle3_cache.target import resolve_aux_layer_ids
from helpers import random_token_block
from tools.packing_probe import alone_rows, largest_differences, packed_cache_rows, packed_rows

SEQ = 20


def test_rows_are_filled_first_fit_longest_first():
    assert packed_rows([8, 20, 4, 13, 2, 10], 20) == [[1], [3, 2, 4], [5, 0]]


def test_packed_conversations_match_each_one_alone(tiny_llama):
    spec = CacheSpec(resolve_aux_layer_ids(tiny_llama, None), torch.arange(0, 128, 3), 128, "fp32", 0)
    tokens = random_token_block([7, SEQ, 3, 12, 1, 9, 18], SEQ, seed=4)
    packed = packed_cache_rows(tiny_llama, spec, tokens, SEQ)
    differences = largest_differences(packed, alone_rows(tiny_llama, spec, tokens))
    assert differences["position_mask_flips"] == 0
    assert differences["aux_hidden_states"] < 1e-5 and differences["target_probs"] < 1e-5
