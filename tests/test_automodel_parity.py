"""NeMo Automodel 0.7.0 as the oracle: its own target wrapper and cache computation must agree with ours."""

from __future__ import annotations

import pytest
import torch

from eagle3_cache.cache_rows import CacheSpec, compute_cache_batch
from eagle3_cache.target import resolve_aux_layer_ids
from helpers import random_token_block

pytest.importorskip(
    "nemo_automodel.components.speculative.precompute_eagle3",
    reason="nemo-automodel 0.7.0 is the parity oracle: pip install --no-deps -r envs/requirements-nodeps-oracle.txt",
)
pytestmark = pytest.mark.automodel

SEQ = 32
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}


def automodel_rows(model, spec: CacheSpec, tokens) -> dict[str, torch.Tensor]:
    """Automodel's precompute path for one batch: HFEagle3TargetModel, then _compute_batch_cache."""
    from nemo_automodel.components.speculative.eagle.target import HFEagle3TargetModel
    from nemo_automodel.components.speculative.precompute_eagle3 import _compute_batch_cache

    target = HFEagle3TargetModel(model, aux_layer_ids=spec.aux_layer_ids)
    batch = target.generate_batch(tokens.input_ids, tokens.attention_mask, tokens.loss_mask)
    mask = torch.zeros(spec.target_vocab_size, dtype=torch.bool)
    mask[spec.selected_token_ids] = True
    return _compute_batch_cache(batch, spec.selected_token_ids, mask, spec.cache_dtype, spec.target_probs_topk)


def assert_rows_match(ours: dict, theirs: dict, tokens, dtype: str) -> None:
    """Ids and masks exactly; float fields within the cache dtype's rounding where they matter."""
    assert ours.keys() == theirs.keys()
    for name in ("input_ids", "attention_mask", "loss_mask", "position_mask"):
        assert torch.equal(ours[name], theirs[name]), name
    content = tokens.attention_mask.bool()
    supervised = theirs["position_mask"].squeeze(-1)
    for name in ours.keys() - {"input_ids", "attention_mask", "loss_mask", "position_mask"}:
        assert ours[name].dtype == theirs[name].dtype, name
        where = content | supervised
        if name == "target_probs_indices":
            assert torch.equal(ours[name][supervised], theirs[name][supervised]), name
            continue
        torch.testing.assert_close(
            ours[name][where].float(), theirs[name][where].float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype]
        )


@pytest.mark.parametrize(("dtype", "topk", "draft_vocab"), [("fp32", 0, 48), ("bf16", 0, 128), ("fp16", 8, 48)])
def test_tiny_model_rows_equal_automodel(tiny_llama, dtype, topk, draft_vocab):
    selected = torch.randperm(128, generator=torch.Generator().manual_seed(3))[:draft_vocab]
    spec = CacheSpec(resolve_aux_layer_ids(tiny_llama, None), selected, 128, dtype, topk)
    tokens = random_token_block([SEQ, 20, 9, 2], SEQ, seed=5)
    ours = compute_cache_batch(tiny_llama, spec, tokens).cpu().padded()
    assert_rows_match(ours, automodel_rows(tiny_llama, spec, tokens), tokens, dtype)
