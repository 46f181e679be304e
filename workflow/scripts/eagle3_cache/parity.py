"""The parity rule: how closely shard rows computed again (or by another tool) must match the stored ones.

Ids and masks must be equal position by position, except that position_mask may flip at a few near
ties under bf16/fp16 compute; float fields must agree where attention_mask is 1, as close as the
dtypes they passed through allow (`tolerance`). `parity_outcome` applies the rule to pairs of
samples; the validation's live parity check and the benchmark (ours against the reference) both
call it, and `parity_result` turns its outcome into the check's result.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .layout import num_shards, samples_in_shard, shard_file_name
from .results import CheckResult, problems_summary
from .shard_format import reconstruct_target_probs
from .tolerance import FieldErrors, Tolerance, parity_tolerance, tolerance_problems, tolerance_row

# With bf16/fp16 compute, a batch of another shape may break a near tie between the target's top two
# tokens the other way; when one of them is in the draft vocabulary and the other is not, that
# position's position_mask flips. Such flips stay rare; a real error (a shift) flips most positions.
MAX_NEAR_TIE_FLIP_SHARE = 0.01
# Positions compared at once ([block, draft vocab] fp32 after reconstruction).
PARITY_POSITION_BLOCK = 128
FLOAT_FIELDS = ("aux_hidden_states", "target_probs")
EXACT_FIELDS = ("input_ids", "attention_mask", "loss_mask", "position_mask")


def parity_sample_indices(num_samples: int, shard_size: int, count: int, seed: int) -> list[int]:
    """`count` distinct samples spread over the shards: one per shard, in a seeded shard order, round after round."""
    rng = np.random.default_rng(seed)
    shard_order = rng.permutation(num_shards(num_samples, shard_size))
    wanted = min(count, num_samples)
    shuffled_rows: dict[int, np.ndarray] = {}
    picks: list[int] = []
    for turn in range(shard_size):
        for shard in shard_order:
            if len(picks) == wanted:
                return sorted(picks)
            if shard not in shuffled_rows:
                shuffled_rows[shard] = rng.permutation(samples_in_shard(int(shard), num_samples, shard_size))
            if turn < len(shuffled_rows[shard]):
                picks.append(int(shard) * shard_size + int(shuffled_rows[shard][turn]))
    return sorted(picks)


def comparable_rows(
    fields: Mapping[str, torch.Tensor], name: str, positions: torch.Tensor, draft_vocab_size: int
) -> torch.Tensor:
    """One sample's `name` rows at `positions`; top-k target_probs scattered back to full width."""
    if name == "target_probs" and "target_probs_values" in fields:
        values, indices = fields["target_probs_values"][positions], fields["target_probs_indices"][positions]
        return reconstruct_target_probs(values, indices, draft_vocab_size)
    return fields[name][positions]


@dataclass
class SampleComparison:
    """One sample recomputed against its stored rows."""

    sample: int
    shard: int
    row: int
    positions: int
    supervised_positions: int
    mismatches: dict[str, int]
    errors: dict[str, FieldErrors]


def compare_sample(
    sample: int,
    shard_size: int,
    live: Mapping[str, torch.Tensor],
    stored: Mapping[str, torch.Tensor],
    draft_vocab_size: int,
    tolerance: Tolerance,
) -> SampleComparison:
    """Exact fields position by position; float fields within tolerance where both say attention_mask is 1."""
    mismatches = {
        name: int((live[name] != stored[name]).reshape(live[name].shape[0], -1).any(dim=-1).sum())
        for name in EXACT_FIELDS
    }
    content = torch.nonzero(live["attention_mask"].bool() & stored["attention_mask"].bool()).flatten()
    errors = {name: FieldErrors(name) for name in FLOAT_FIELDS}
    for start in range(0, len(content), PARITY_POSITION_BLOCK):
        positions = content[start : start + PARITY_POSITION_BLOCK]
        for name, field_errors in errors.items():
            field_errors.add_block(
                comparable_rows(live, name, positions, draft_vocab_size),
                comparable_rows(stored, name, positions, draft_vocab_size),
                positions,
                tolerance,
            )
    shard, row = divmod(sample, shard_size)
    positions = stored["input_ids"].shape[0]
    return SampleComparison(sample, shard, row, positions, int(stored["loss_mask"].sum()), mismatches, errors)


def allowed_position_mask_flips(supervised_positions: int, tolerance: Tolerance) -> int:
    """Zero when every computation ran in fp32; else a small share of the supervised positions (near ties)."""
    if not tolerance.reduced_precision:
        return 0
    return math.floor(MAX_NEAR_TIE_FLIP_SHARE * supervised_positions)


def parity_problems(comparisons: Sequence[SampleComparison], tolerance: Tolerance, allowed_flips: int) -> list[str]:
    """One line per sample and field that differs beyond what is allowed."""
    problems = []
    for c in comparisons:
        where = f"sample {c.sample} ({shard_file_name(c.shard)} row {c.row})"
        for name, count in c.mismatches.items():
            if count and not (name == "position_mask" and allowed_flips):
                problems.append(f"{where}: {name} differs at {count} position(s)")
        problems += tolerance_problems(where, c.errors, tolerance)
    flips = sum(c.mismatches["position_mask"] for c in comparisons)
    if allowed_flips and flips > allowed_flips:
        problems.append(f"position_mask differs at {flips} positions, more than the {allowed_flips} near ties allowed")
    return problems


def field_rows(comparisons: Sequence[SampleComparison], tolerance: Tolerance) -> list[dict[str, Any]]:
    """Per field, what was compared under which rule, and the largest errors over every sample."""
    return [tolerance_row(name, [c.errors[name] for c in comparisons], tolerance) for name in FLOAT_FIELDS] + [
        {
            "field": name,
            "rule": "exact",
            "compared": sum(c.positions for c in comparisons),
            "differing": sum(c.mismatches[name] for c in comparisons),
            "max_abs_error": None,
            "max_rel_error": None,
            "max_distance": None,
        }
        for name in EXACT_FIELDS
    ]


@dataclass(frozen=True)
class ParityOutcome:
    """The rule applied to some samples: each one's comparison, the tolerance used, and what breaks it."""

    comparisons: list[SampleComparison]
    tolerance: Tolerance
    allowed_flips: int
    problems: list[str]

    @property
    def fields(self) -> list[dict[str, Any]]:
        return field_rows(self.comparisons, self.tolerance)

    @property
    def position_mask_flips(self) -> int:
        return sum(c.mismatches["position_mask"] for c in self.comparisons)


def parity_outcome(
    samples: Iterable[tuple[int, Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]],
    *,
    shard_size: int,
    draft_vocab_size: int,
    cache_dtype: torch.dtype,
    compute_dtypes: set[torch.dtype],
) -> ParityOutcome:
    """The rule over `(sample index, live fields, stored fields)` triples, one sample's `[S, ...]` rows each.

    `compute_dtypes` are the dtypes either side was computed in; `samples` is consumed one at a time,
    so a generator keeps one sample in memory.
    """
    tolerance = parity_tolerance(cache_dtype, compute_dtypes)
    comparisons = [
        compare_sample(sample, shard_size, live, stored, draft_vocab_size, tolerance)
        for sample, live, stored in samples
    ]
    allowed_flips = allowed_position_mask_flips(sum(c.supervised_positions for c in comparisons), tolerance)
    return ParityOutcome(comparisons, tolerance, allowed_flips, parity_problems(comparisons, tolerance, allowed_flips))


def parity_result(outcome: ParityOutcome, load_seconds: float) -> CheckResult:
    """The live parity check's result: per field, the largest errors over every sample checked."""
    comparisons, problems = outcome.comparisons, outcome.problems
    samples = [{"sample": c.sample, "shard": c.shard, "row": c.row} for c in comparisons]
    figures = {
        "samples_checked": len(comparisons),
        "eps": outcome.tolerance.eps,
        "tolerance": outcome.tolerance.rule,
        "position_mask_flips_allowed": outcome.allowed_flips,
        "model_load_seconds": load_seconds,
    }
    ids = ", ".join(str(c.sample) for c in comparisons)
    if problems:
        summary = problems_summary(problems)
    else:
        summary = f"{len(comparisons)} samples ({ids}) recomputed by the live target match the cache"
    series = {"fields": outcome.fields, "samples": samples}
    return CheckResult("parity", not problems, summary, figures, series, problems)
