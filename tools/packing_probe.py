"""Does packing several conversations into one row beat the shard job's length-sorted forwards?

Packing puts conversations end to end in rows of `--row-length` positions, each with its own
position ids and a block-diagonal causal mask, so the target sees each conversation exactly as
it would alone: the same tokens, positions and visible keys, plus the one trailing pad position
whose logits the last content token's stored distribution comes from. It saves the padding of
length-sorted forwards and pays for a dense mask over the whole row, which attention kernels
without a variable-length path compute in full.

The probe runs the same conversations both ways with the same positions per forward, times
them in alternating rounds (forward and distribution only, as the shard job's phases count
them), and checks every packed conversation against `compute_cache_batch` on it alone:

    PYTHONPATH=workflow/scripts .venv/bin/python tools/packing_probe.py \\
        --model resources/models/SmolLM2-135M-Instruct \\
        --tokenized results/demo/tokenized.h5 --selection results/demo/vocab_selection.pt

Both ways run through PyTorch's SDPA attention, as the shard job does. A variable-length
attention path (flash-attention's, on CUDA) would skip the masked blocks; this probe does not
cover it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from eagle3_cache.array_ops import shifted_left
from eagle3_cache.cache_rows import (
    CacheSpec,
    captured_layer_outputs,
    compute_cache_batch,
    draft_logits_from_hidden,
    forward_width,
    plain_output_head,
)
from eagle3_cache.pipeline import forward_batches
from eagle3_cache.target import load_target, resolve_aux_layer_ids, resolve_device
from eagle3_cache.token_store import TokenBlock, read_token_block, token_rows
from eagle3_cache.vocab_selection import read_vocab_selection


@dataclass(frozen=True)
class Placement:
    """Where one conversation lies in a packed forward: its packed row, first position and block length."""

    sample: int
    row: int
    start: int
    length: int


def packed_rows(widths: list[int], row_length: int) -> list[list[int]]:
    """Samples placed first-fit in decreasing width order into rows of at most `row_length` positions."""
    rows: list[list[int]] = []
    free: list[int] = []
    for sample in sorted(range(len(widths)), key=lambda s: (-widths[s], s)):
        fitting = next((i for i, room in enumerate(free) if room >= widths[sample]), None)
        if fitting is None:
            rows.append([sample])
            free.append(row_length - widths[sample])
        else:
            rows[fitting].append(sample)
            free[fitting] -= widths[sample]
    return rows


def packed_forward(tokens: TokenBlock, rows: list[list[int]], widths: list[int], row_length: int):
    """Input ids, position ids and a block-diagonal causal mask `[n, 1, L, L]` for packed rows, and placements."""
    n = len(rows)
    input_ids = torch.zeros((n, row_length), dtype=torch.int64)
    position_ids = torch.zeros((n, row_length), dtype=torch.int64)
    block = torch.full((n, row_length), -1, dtype=torch.int64)
    content = torch.zeros((n, row_length), dtype=torch.bool)
    placements = []
    for row, samples in enumerate(rows):
        start = 0
        for sample in samples:
            width = widths[sample]
            input_ids[row, start : start + width] = tokens.input_ids[sample, :width]
            position_ids[row, start : start + width] = torch.arange(width)
            block[row, start : start + width] = sample
            content[row, start : start + width] = tokens.attention_mask[sample, :width].bool()
            placements.append(Placement(sample, row, start, width))
            start += width
    causal = torch.ones((row_length, row_length), dtype=torch.bool).tril()
    same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    # A pad position's key stays hidden, as the padding mask hides it when the conversation runs alone.
    mask = same_block & causal & content[:, None, :]
    # A query that sees no key at all (filler at a row's end) would give NaNs; let it see itself.
    mask |= torch.eye(row_length, dtype=torch.bool) & ~mask.any(-1, keepdim=True)
    return input_ids, position_ids, mask.unsqueeze(1), placements


@torch.no_grad()
def packed_cache_rows(model, spec: CacheSpec, tokens: TokenBlock, row_length: int) -> dict[int, dict]:
    """Each sample's aux hidden states, draft probabilities and position mask from packed forwards."""
    seq_length = tokens.input_ids.shape[1]
    lengths = tokens.attention_mask.sum(dim=1)
    widths = [forward_width(lengths[s : s + 1], seq_length, "distribution") for s in range(len(lengths))]
    input_ids, position_ids, mask, placements = packed_forward(
        tokens, packed_rows(widths, row_length), widths, row_length
    )
    head = plain_output_head(model)
    with captured_layer_outputs(model, spec.aux_layer_ids) as captured:
        hidden = model.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False
        ).last_hidden_state
    aux = torch.cat([captured[i] for i in spec.aux_layer_ids], dim=-1)
    shifted_loss_mask = shifted_left(tokens.loss_mask)
    # Position p is supervised by the output at p + 1 of the same conversation.
    next_hidden = torch.zeros_like(hidden)
    loss_mask = torch.zeros(hidden.shape[:2], dtype=torch.int64)
    for p in placements:
        next_hidden[p.row, p.start : p.start + p.length - 1] = hidden[p.row, p.start + 1 : p.start + p.length]
        loss_mask[p.row, p.start : p.start + p.length - 1] = shifted_loss_mask[p.sample, : p.length - 1]
    logits, position_mask = draft_logits_from_hidden(next_hidden, head, loss_mask, spec)
    probs = torch.softmax(logits.float(), dim=-1)
    fields = {}
    for p in placements:
        content = slice(p.start, p.start + min(p.length, int(lengths[p.sample])))
        fields[p.sample] = {
            "aux_hidden_states": aux[p.row, content],
            "target_probs": probs[p.row, content],
            "position_mask": position_mask[p.row, content],
        }
    return fields


def alone_rows(model, spec: CacheSpec, tokens: TokenBlock) -> dict[int, dict]:
    """Each sample's fields as `compute_cache_batch` gives them for that sample alone (content positions)."""
    rows = {}
    for sample in range(tokens.input_ids.shape[0]):
        batch = compute_cache_batch(model, spec, token_rows(tokens, [sample]))
        length = int(batch.lengths[0])
        rows[sample] = {name: batch.computed[name][0, :length] for name in ("aux_hidden_states", "target_probs")}
        rows[sample]["position_mask"] = batch.computed["position_mask"][0, :length]
    return rows


def largest_differences(packed: dict[int, dict], alone: dict[int, dict]) -> dict[str, float]:
    """Per field, the largest |packed - alone| relative to the largest |alone| at that position; mask flips."""
    worst = {"aux_hidden_states": 0.0, "target_probs": 0.0}
    flips = 0
    for sample, expected in alone.items():
        for name in worst:
            diff = (packed[sample][name].float() - expected[name].float()).abs()
            scale = expected[name].float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
            worst[name] = max(worst[name], float((diff / scale).max()))
        flips += int((packed[sample]["position_mask"] != expected["position_mask"]).sum())
    return {**worst, "position_mask_flips": flips}


def timed(function) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local target model directory")
    parser.add_argument("--tokenized", required=True, help="a tokenized.h5 the tokenize rule wrote")
    parser.add_argument("--selection", required=True, help="the vocab_selection.pt of the same run")
    parser.add_argument("--samples", type=int, default=64, help="conversations, from the first (default 64)")
    parser.add_argument("--tokens-per-forward", type=int, default=2048, help="positions per forward, both ways")
    parser.add_argument("--row-length", type=int, help="positions per packed row (default: seq_length)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"])
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = load_target(args.model, revision=None, trust_remote_code=False, device=device)
    if plain_output_head(model) is None:
        parser.error(f"{args.model}: the probe needs a plain output layer (a Llama, Mistral or Qwen family model)")
    selected, target_vocab_size = read_vocab_selection(args.selection)
    spec = CacheSpec(resolve_aux_layer_ids(model, None), torch.from_numpy(selected), target_vocab_size, "fp32", 0)
    tokens = read_token_block(args.tokenized, 0, args.samples)
    seq_length = tokens.input_ids.shape[1]
    row_length = args.row_length or seq_length
    if args.tokens_per_forward < row_length:
        parser.error(f"--tokens-per-forward {args.tokens_per_forward} must hold one packed row ({row_length})")
    lengths = tokens.attention_mask.sum(dim=1)
    grouped = forward_batches(lengths, seq_length, args.tokens_per_forward)
    widths = [forward_width(lengths[s : s + 1], seq_length, "distribution") for s in range(len(lengths))]
    packed = packed_rows(widths, row_length)
    rows_per_forward = args.tokens_per_forward // row_length
    packed_forwards = [sum(packed[i : i + rows_per_forward], []) for i in range(0, len(packed), rows_per_forward)]

    def run_grouped():
        for rows in grouped:
            compute_cache_batch(model, spec, token_rows(tokens, rows))

    def run_packed():
        for samples in packed_forwards:
            packed_cache_rows(model, spec, token_rows(tokens, samples), row_length)

    real = int(lengths.sum())
    grouped_positions = sum(len(rows) * forward_width(lengths[rows], seq_length, "distribution") for rows in grouped)
    packed_positions = len(packed) * row_length
    print(f"{args.samples} conversations, {real} real tokens, seq_length {seq_length}, {args.threads} threads")
    print(f"grouped: {len(grouped)} forwards, {grouped_positions} positions ({grouped_positions / real - 1:.1%} extra)")
    print(
        f"packed:  {len(packed_forwards)} forwards of {rows_per_forward} rows x {row_length}, "
        f"{packed_positions} positions ({packed_positions / real - 1:.1%} extra)"
    )

    differences = largest_differences(
        packed_cache_rows(model, spec, tokens, row_length), alone_rows(model, spec, tokens)
    )
    print("packed vs alone, largest |difference| / largest |value| at the position:", differences)

    seconds = {"grouped": [], "packed": []}
    run_grouped()
    for _ in range(args.rounds):
        seconds["grouped"].append(timed(run_grouped))
        seconds["packed"].append(timed(run_packed))
    for name, values in seconds.items():
        per_token = [s / real * 1e6 for s in values]
        print(
            f"{name:8s} s: min {min(values):.2f} median {statistics.median(values):.2f} max {max(values):.2f}; "
            f"us per real token: min {min(per_token):.0f} median {statistics.median(per_token):.0f} "
            f"max {max(per_token):.0f}"
        )


if __name__ == "__main__":
    main()
