"""The shared cache computation against a straightforward, unoptimised computation of the same rows."""

from __future__ import annotations

import pytest
import torch
from helpers import random_token_block, tiny_llama_config
from eagle3_cache.errors import CacheConfigError
from eagle3_cache.shard_format import reconstruct_target_probs
from eagle3_cache.target import (
    CacheSpec,
    compute_cache_batch,
    decoder_layers,
    default_aux_layer_ids,
    resolve_aux_layer_ids,
    resolve_device,
    shifted_left,
)

SEQ = 24


def straightforward_rows(model, spec: CacheSpec, tokens) -> dict[str, torch.Tensor]:
    """The textbook computation on full padded rows, in fp32: no trimming, no bucketing."""
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
    aux = torch.cat([out.hidden_states[i + 1] for i in spec.aux_layer_ids], dim=-1)
    logits = torch.cat([out.logits[:, 1:], torch.zeros_like(out.logits[:, :1])], dim=1)
    loss_mask = shifted_left(tokens.loss_mask)
    selected_mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
    selected_mask[spec.selected_token_ids] = True
    return {
        "input_ids": shifted_left(tokens.input_ids),
        "attention_mask": tokens.attention_mask,
        "loss_mask": loss_mask,
        "aux_hidden_states": aux,
        "position_mask": (selected_mask[logits.argmax(-1)] & loss_mask.bool()).unsqueeze(-1),
        "target_probs": torch.softmax(logits[..., spec.selected_token_ids].float(), dim=-1),
    }


def spec_for(model, dtype="fp32", topk=0, draft_vocab=40, aux=None) -> CacheSpec:
    selected = torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(1))[:draft_vocab]
    return CacheSpec(resolve_aux_layer_ids(model, aux), selected, model.config.vocab_size, dtype, topk)


# A full-length (truncated) row, rows of mixed lengths, and a one-token row.
LENGTHS = [SEQ, 17, 5, 1]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rows_equal_the_straightforward_computation_on_content(tiny_llama, dtype):
    spec = spec_for(tiny_llama, dtype=dtype)
    tokens = random_token_block(LENGTHS, SEQ)
    ours = compute_cache_batch(tiny_llama, spec, tokens).cpu().padded()
    reference = straightforward_rows(tiny_llama, spec, tokens)
    content = tokens.attention_mask.bool()
    for name in ("input_ids", "attention_mask", "loss_mask", "position_mask"):
        assert torch.equal(ours[name], reference[name]), name
    tolerance = {"fp32": 1e-5, "bf16": 1e-2}[dtype]
    for name in ("aux_hidden_states", "target_probs"):
        assert ours[name].dtype == spec.cache_dtype
        got, want = ours[name].float()[content], reference[name].float()[content]
        torch.testing.assert_close(got, want.to(spec.cache_dtype).float(), atol=tolerance, rtol=tolerance)
        assert not ours[name][~content].any(), f"{name} must hold zeros off content"


def test_shift_puts_zero_in_the_last_slot_and_leaves_attention_mask(tiny_llama):
    tokens = random_token_block([SEQ, 9], SEQ)
    rows = compute_cache_batch(tiny_llama, spec_for(tiny_llama), tokens)
    assert torch.equal(rows.input_ids[:, :-1], tokens.input_ids[:, 1:])
    assert not rows.input_ids[:, -1].any() and not rows.loss_mask[:, -1].any()
    assert torch.equal(rows.attention_mask, tokens.attention_mask)


def test_position_mask_lies_inside_the_shifted_loss_mask(tiny_llama):
    tokens = random_token_block(LENGTHS, SEQ)
    rows = compute_cache_batch(tiny_llama, spec_for(tiny_llama, draft_vocab=128), tokens).cpu().padded()
    position = rows["position_mask"].squeeze(-1)
    assert torch.equal(position, rows["loss_mask"].bool()), "full draft vocab: every supervised position counts"
    rows = compute_cache_batch(tiny_llama, spec_for(tiny_llama, draft_vocab=5), tokens).cpu().padded()
    assert not (rows["position_mask"].squeeze(-1) & ~rows["loss_mask"].bool()).any()


def test_topk_stores_renormalized_values_and_int32_indices(tiny_llama):
    spec = spec_for(tiny_llama, topk=4)
    tokens = random_token_block(LENGTHS, SEQ)
    rows = compute_cache_batch(tiny_llama, spec, tokens).cpu().padded()
    assert "target_probs" not in rows
    values, indices = rows["target_probs_values"], rows["target_probs_indices"]
    assert indices.dtype == torch.int32 and values.shape[-1] == 4
    content = tokens.attention_mask.bool()
    torch.testing.assert_close(values[content].sum(-1), torch.ones(int(content.sum())))
    full = straightforward_rows(tiny_llama, spec, tokens)["target_probs"]
    top = torch.topk(full, 4, dim=-1)
    torch.testing.assert_close(values[content], (top.values / top.values.sum(-1, keepdim=True))[content])
    assert torch.equal(indices[content].long(), top.indices[content])
    rebuilt = reconstruct_target_probs(values, indices, spec.draft_vocab_size)
    assert rebuilt.shape[-1] == spec.draft_vocab_size


def test_topk_at_or_above_the_draft_vocab_stores_the_full_distribution(tiny_llama):
    spec = spec_for(tiny_llama, topk=40, draft_vocab=40)
    rows = compute_cache_batch(tiny_llama, spec, random_token_block([7], SEQ)).computed
    assert "target_probs" in rows and "target_probs_values" not in rows


def test_batch_composition_does_not_change_a_row(tiny_llama):
    spec = spec_for(tiny_llama)
    tokens = random_token_block(LENGTHS, SEQ)
    together = compute_cache_batch(tiny_llama, spec, tokens).cpu().padded()
    for row in range(len(LENGTHS)):
        alone_tokens = type(tokens)(*(t[row : row + 1] for t in (tokens.input_ids, tokens.attention_mask, tokens.loss_mask)))
        alone = compute_cache_batch(tiny_llama, spec, alone_tokens).cpu().padded()
        for name, values in alone.items():
            torch.testing.assert_close(values[0].float(), together[name][row].float(), atol=1e-5, rtol=1e-5)


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


def test_the_head_shortcut_equals_the_full_logits_path(tiny_llama, monkeypatch):
    import eagle3_cache.target as target

    assert target.plain_output_head(tiny_llama) is tiny_llama.lm_head
    spec = spec_for(tiny_llama, draft_vocab=20)
    tokens = random_token_block(LENGTHS, SEQ, seed=9)
    monkeypatch.setattr(target, "TOP1_CHUNK_ROWS", 3)  # several top-1 chunks per batch
    shortcut = compute_cache_batch(tiny_llama, spec, tokens).cpu().padded()
    monkeypatch.setattr(target, "plain_output_head", lambda model: None)
    full = compute_cache_batch(tiny_llama, spec, tokens).cpu().padded()
    assert torch.equal(shortcut["position_mask"], full["position_mask"])
    for name in ("aux_hidden_states", "target_probs"):
        torch.testing.assert_close(shortcut[name], full[name], atol=1e-6, rtol=1e-5)


def test_unknown_architectures_take_the_full_logits_path(tiny_llama, monkeypatch):
    from eagle3_cache.target import plain_output_head

    monkeypatch.setattr(tiny_llama.config, "model_type", "gemma2")  # softcaps its logits
    assert plain_output_head(tiny_llama) is None
