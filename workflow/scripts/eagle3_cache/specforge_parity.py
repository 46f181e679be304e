"""Live parity for the specforge format: stored hidden states against a fresh forward, and lm_head(hidden_state)
against the target's own logits (what SpecForge's TargetHead must reproduce).

The live parity job (`live_parity.run_parity_job`) calls `compared_specforge_samples` for a specforge
run, in place of the Automodel comparison.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .cache_rows import CacheSpec, compute_cache_batch
from .layout import shard_dir_name
from .live_parity import ParityInputs, parity_spec, shard_compute_dtypes
from .manifest import read_shard_stats
from .results import CheckResult, problems_summary
from .specforge_format import TARGET_REPR, read_sample_file
from .specforge_layout import sample_file_name
from .token_store import TokenBlock, read_token_rows
from .tolerance import FieldErrors, Tolerance, parity_tolerance, tolerance_problems, tolerance_row

# Positions whose full-vocabulary logits are compared at once ([block, V] fp32).
LOGIT_POSITION_BLOCK = 128
# What each stored hidden state is compared with in a fresh `compute_cache_batch`.
RECOMPUTED = {"hidden_state": "final_hidden_state", "aux_hidden_state": "aux_hidden_states"}


def sample_path(cache_dir: Path, shard_size: int, sample: int) -> Path:
    """Where the specforge format puts one sample's file."""
    return cache_dir / shard_dir_name(sample // shard_size) / sample_file_name(sample)


@torch.no_grad()
def compare_with_live_target(
    model: nn.Module, spec: CacheSpec, stored: Mapping[str, torch.Tensor], tokens: TokenBlock, tolerance: Tolerance
) -> dict[str, FieldErrors]:
    """One sample's stored hidden states against a fresh forward, and lm_head of its stored hidden state
    against the target's own logits."""
    length = int(tokens.attention_mask.sum())
    live = compute_cache_batch(model, spec, tokens).cpu().computed
    positions = torch.arange(length)
    errors = {key: FieldErrors(key) for key in (*RECOMPUTED, "logits")}
    for key, name in RECOMPUTED.items():
        errors[key].add_block(live[name][0, :length], stored[key][0], positions, tolerance)
    device = model.get_input_embeddings().weight.device
    head = model.get_output_embeddings()
    logits = model(input_ids=tokens.input_ids[:, :length].to(device), use_cache=False).logits[0]
    for start in range(0, length, LOGIT_POSITION_BLOCK):
        block = positions[start : start + LOGIT_POSITION_BLOCK]
        ours = head(stored["hidden_state"][0, block].to(device=device, dtype=head.weight.dtype))
        errors["logits"].add_block(ours.cpu(), logits[block].cpu(), block, tolerance)
    return errors


def compared_specforge_samples(
    model: nn.Module, inputs: ParityInputs, samples: list[int], load_seconds: float
) -> CheckResult:
    """`samples` recomputed by the loaded target and compared with their files."""
    stats = read_shard_stats(inputs.stats)
    spec = dataclasses.replace(parity_spec(inputs, stats), target_repr=TARGET_REPR)
    tolerance = parity_tolerance(spec.cache_dtype, shard_compute_dtypes(stats) | {next(model.parameters()).dtype})
    tokens = read_token_rows(inputs.tokenized, samples)
    shard_size = inputs.settings["shard_size"]
    compared = {
        sample: compare_with_live_target(
            model,
            spec,
            read_sample_file(sample_path(inputs.cache_dir, shard_size, sample)),
            TokenBlock(tokens.input_ids[i : i + 1], tokens.attention_mask[i : i + 1], tokens.loss_mask[i : i + 1]),
            tolerance,
        )
        for i, sample in enumerate(samples)
    }
    return specforge_parity_result(compared, tolerance, load_seconds)


def specforge_parity_result(
    compared: Mapping[int, Mapping[str, FieldErrors]], tolerance: Tolerance, load_seconds: float
) -> CheckResult:
    """Per field, the largest errors over every sample checked; a problem per sample and field beyond tolerance."""
    keys = next(iter(compared.values())).keys()
    fields = [tolerance_row(key, [errors[key] for errors in compared.values()], tolerance) for key in keys]
    problems = [
        line
        for sample, errors in compared.items()
        for line in tolerance_problems(f"sample {sample}", errors, tolerance)
    ]
    figures = {
        "samples_checked": len(compared),
        "eps": tolerance.eps,
        "tolerance": tolerance.rule,
        "model_load_seconds": load_seconds,
    }
    series = {"fields": fields, "samples": [{"sample": sample} for sample in compared]}
    if problems:
        return CheckResult("parity", False, problems_summary(problems), figures, series, problems)
    summary = (
        f"{len(compared)} samples ({', '.join(map(str, compared))}): stored hidden states match a fresh forward, "
        "and lm_head(hidden_state) gives the target's own logits"
    )
    return CheckResult("parity", True, summary, figures, series)
