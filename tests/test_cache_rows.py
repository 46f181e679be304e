"""The shared cache computation against a straightforward, unoptimised computation of the same rows."""

from __future__ import annotations

import pytest
import torch

from eagle3_cache import cache_rows
from eagle3_cache.array_ops import shifted_left
from eagle3_cache.cache_rows import (
    CacheSpec,
    captured_layer_outputs,
    compute_cache_batch,
    forward_width,
    stored_distribution,
    stored_distribution_fields,
)
from eagle3_cache.shard_format import reconstruct_target_probs
from eagle3_cache.target import resolve_aux_layer_ids
from helpers import random_token_block

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
        alone_tokens = type(tokens)(
            *(t[row : row + 1] for t in (tokens.input_ids, tokens.attention_mask, tokens.loss_mask))
        )
        alone = compute_cache_batch(tiny_llama, spec, alone_tokens).cpu().padded()
        for name, values in alone.items():
            torch.testing.assert_close(values[0].float(), together[name][row].float(), atol=1e-5, rtol=1e-5)


def test_the_head_shortcut_equals_the_full_logits_path(tiny_llama, monkeypatch):
    import eagle3_cache.cache_rows as cache_rows

    assert cache_rows.plain_output_head(tiny_llama) is tiny_llama.lm_head
    spec = spec_for(tiny_llama, draft_vocab=20)
    tokens = random_token_block(LENGTHS, SEQ, seed=9)
    monkeypatch.setattr(cache_rows, "TOP1_CHUNK_ROWS", 3)  # several top-1 chunks per batch
    shortcut = compute_cache_batch(tiny_llama, spec, tokens).cpu().padded()
    monkeypatch.setattr(cache_rows, "plain_output_head", lambda model: None)
    full = compute_cache_batch(tiny_llama, spec, tokens).cpu().padded()
    assert torch.equal(shortcut["position_mask"], full["position_mask"])
    for name in ("aux_hidden_states", "target_probs"):
        torch.testing.assert_close(shortcut[name], full[name], atol=1e-6, rtol=1e-5)


def test_unknown_architectures_take_the_full_logits_path(tiny_llama, monkeypatch):
    from eagle3_cache.cache_rows import plain_output_head

    monkeypatch.setattr(tiny_llama.config, "model_type", "gemma2")  # softcaps its logits
    assert plain_output_head(tiny_llama) is None


def test_the_target_runs_one_position_past_the_longest_row_within_seq_length():
    assert forward_width(torch.tensor([5, 3]), SEQ, "distribution") == 6
    assert forward_width(torch.tensor([SEQ, 3]), SEQ, "distribution") == SEQ


def test_for_hidden_states_the_target_runs_on_the_longest_row_only():
    assert forward_width(torch.tensor([5, 3]), SEQ, "hidden_state") == 5
    assert forward_width(torch.tensor([SEQ, 3]), SEQ, "hidden_state") == SEQ


def test_captured_layer_outputs_are_the_hidden_states_after_each_layer(tiny_llama):
    tokens = random_token_block([9], SEQ)
    with torch.no_grad(), captured_layer_outputs(tiny_llama, [0, 3]) as captured:
        out = tiny_llama(input_ids=tokens.input_ids, output_hidden_states=True)
    assert sorted(captured) == [0, 3]
    for layer_id in (0, 3):
        assert torch.equal(captured[layer_id], out.hidden_states[layer_id + 1])
    kept = dict(captured)
    with torch.no_grad():
        tiny_llama(input_ids=tokens.input_ids.flip(1))
    assert all(captured[layer_id] is kept[layer_id] for layer_id in kept), "the hooks must be removed on exit"


@pytest.mark.parametrize("topk", [0, 4])
@pytest.mark.parametrize(
    "block_bytes", [cache_rows.DISTRIBUTION_BLOCK_BYTES, 4 * 8 * 2, 4 * 8], ids=["whole", "rows", "positions"]
)
def test_the_stored_distribution_is_each_positions_softmax_in_bounded_blocks_then_the_last_slot(
    tiny_llama, monkeypatch, topk, block_bytes
):
    monkeypatch.setattr(cache_rows, "DISTRIBUTION_BLOCK_BYTES", block_bytes)
    spec = spec_for(tiny_llama, draft_vocab=8, topk=topk)
    logits = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    rows = stored_distribution_fields(logits, torch.ones((2, 3, 1), dtype=torch.bool), spec)
    assert rows["position_mask"].shape == (2, 4, 1) and not rows["position_mask"][:, -1].any()
    whole = stored_distribution(torch.softmax(logits.float(), dim=-1), spec)
    for name, values in whole.items():
        assert torch.equal(rows[name][:, :3], values), name
    width = topk or spec.draft_vocab_size
    last = rows["target_probs_values" if spec.stores_topk else "target_probs"][:, -1]
    torch.testing.assert_close(last, torch.full((2, width), 1 / width).to(last.dtype))
