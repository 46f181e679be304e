"""Validation of a finished cache: eight checks, and one self-contained HTML report of their results.

Each check is a function returning a `CheckResult` (passed or not, a one-line summary, figures,
series for tables and charts, details). `validate_cache` runs them all; a check that cannot run
(an unreadable file, a missing manifest) is a failed check, never a crash, so a report is always
written. `render_html` turns the results into one HTML file with inline CSS and inline SVG charts:
no script, no stylesheet or image to fetch, so it opens from disk in any browser.

Shards are streamed a few rows at a time, so RAM stays bounded whatever the cache's size.

To see a report as a browser draws it, without a display (Debian: `apt-get install -y chromium`):

    chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --no-first-run --window-size=1200,2400 \
        --screenshot=report.png file://$PWD/results/demo/validation_report.html

(`REPORT_SCREENSHOT=report.png pytest tests/test_report.py -k chromium` does the same on a test cache.)
"""

from __future__ import annotations

import csv
import functools
import html
import json
import logging
import math
import re
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import CACHE_SEMANTICS_VERSION
from .atomic import atomic_output, write_json_atomic
from .provenance import producer
from .shard_format import (
    DTYPES,
    EMBEDDINGS_FILE,
    ShardLayout,
    check_cache,
    num_shards,
    read_manifest,
    read_shard_block,
    read_shard_rows,
    reconstruct_target_probs,
    safetensors_header,
    samples_in_shard,
    shard_file_name,
    shard_indices_in,
)
from .target import CacheSpec, compute_cache_batch, compute_dtype, shifted_left
from .token_store import TokenBlock, TokenizedInfo, read_token_block, read_token_rows, read_tokenized_info
from .vocab import read_vocab_selection

log = logging.getLogger(__name__)

TITLES = {
    "integrity": "Complete and intact",
    "parity": "Live parity",
    "sanity": "Numerically sane",
    "supervision": "Supervision",
    "vocabulary": "Draft vocabulary",
    "disk": "Disk",
    "cost": "Cost",
    "provenance": "Provenance",
}
# Stored and recomputed values may differ by this many units of the coarser dtype's rounding.
TOLERANCE_ULPS = 4
# Below half, the draft is asked mostly for tokens it cannot produce: a misconfigured vocabulary.
MIN_DRAFT_SHARE = 0.5
# With bf16/fp16 compute, a batch of another shape may break a near tie between the target's top two
# tokens the other way; when one of them is in the draft vocabulary and the other is not, that
# position's position_mask flips. Such flips stay rare; a real error (a shift) flips most positions.
MAX_NEAR_TIE_FLIP_SHARE = 0.01
# How much of a shard the scan holds in memory at once.
READ_BUDGET_BYTES = 256 << 20
# Positions compared at once in the parity check ([block, draft vocab] fp32 after reconstruction).
PARITY_POSITION_BLOCK = 128
# Sample indices listed in the report and the JSON (counts are always complete).
MAX_LISTED = 200
PROJECTED_SAMPLES = {"100k": 100_000, "1M": 1_000_000}
FLOAT_FIELDS = ("aux_hidden_states", "target_probs")
EXACT_FIELDS = ("input_ids", "attention_mask", "loss_mask", "position_mask")


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    `figures` are scalars (or small dicts) shown as a table; `series` are lists (rows of a table,
    points of a chart) that the renderer draws per check. Figure names ending in `_bytes`,
    `_share` and `_seconds` are shown as sizes, percentages and durations.
    """

    key: str
    passed: bool
    summary: str
    figures: dict[str, Any] = field(default_factory=dict)
    series: dict[str, list] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def title(self) -> str:
        return TITLES[self.key]

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "passed": self.passed,
            "summary": self.summary,
            "figures": self.figures,
            "series": self.series,
            "details": self.details,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class ValidationReport:
    """Every check's result for one run's cache."""

    run: str
    cache_dir: str
    checks: list[CheckResult]
    generated_at: str

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed_titles(self) -> list[str]:
        return [check.title for check in self.checks if not check.passed]

    @property
    def seconds(self) -> float:
        return sum(check.seconds for check in self.checks)

    def check(self, key: str) -> CheckResult | None:
        return next((check for check in self.checks if check.key == key), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "cache_dir": self.cache_dir,
            "passed": self.passed,
            "failed_checks": self.failed_titles,
            "generated_at": self.generated_at,
            "validation_seconds": round(self.seconds, 3),
            "validator": producer(),
            "checks": [json_safe(check.to_json()) for check in self.checks],
        }


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinite floats (the errors of a broken cache) as strings, so the JSON stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    return value


@dataclass(frozen=True)
class ValidationInputs:
    """The files of one run that validation reads, and its settings."""

    run: str
    cache_dir: Path
    tokenized: Path
    selection: Path
    counts: Path
    stats: Sequence[Path]
    benchmarks: Sequence[Path]
    num_samples: int  # samples recomputed by the parity check
    seed: int


def problems_summary(problems: Sequence[str]) -> str:
    """The summary line of a failed check: its problem, or how many and the first."""
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems; first: {problems[0]}"


def listed(indices: Sequence[int]) -> str:
    """Sample indices for a message, cut after MAX_LISTED."""
    shown = ", ".join(str(i) for i in indices[:MAX_LISTED])
    return shown + (f" and {len(indices) - MAX_LISTED} more" if len(indices) > MAX_LISTED else "")


# --- 1. Complete and intact ------------------------------------------------------------------


def integrity_check(cache_dir: Path) -> CheckResult:
    """The cache directory against its manifest (`shard_format.check_cache`, hashes included)."""
    problems = [str(problem) for problem in check_cache(cache_dir)]
    shards = shard_indices_in(cache_dir)
    figures = {
        "shard_files": len(shards),
        "verified_bytes": sum((cache_dir / shard_file_name(i)).stat().st_size for i in shards),
        "problems": len(problems),
    }
    if problems:
        return CheckResult("integrity", False, problems_summary(problems), figures, details=problems)
    summary = f"all {len(shards)} shards present; sample counts, sizes, sha256, keys, shapes and dtypes as recorded"
    return CheckResult("integrity", True, summary, figures)


# --- 2. Live parity --------------------------------------------------------------------------


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


def cache_spec(manifest: Mapping[str, Any]) -> CacheSpec:
    """The CacheSpec the manifest says the shards were computed under."""
    return CacheSpec(
        aux_layer_ids=list(manifest["aux_layer_ids"]),
        selected_token_ids=torch.tensor(manifest["selected_token_ids"], dtype=torch.long),
        target_vocab_size=int(manifest["target_vocab_size"]),
        dtype=manifest["dtype"],
        target_probs_topk=int(manifest["target_probs_topk"] or 0),
    )


def parity_eps(cache_dtype: torch.dtype, compute_dtypes: set[torch.dtype]) -> float:
    """The rounding unit of the coarsest dtype a stored or recomputed value passed through."""
    return max(torch.finfo(dtype).eps for dtype in {cache_dtype, *compute_dtypes})


def shard_compute_dtypes(stats: Sequence[Mapping[str, Any]]) -> set[torch.dtype]:
    """The dtypes the shard jobs computed in (from the device each one recorded)."""
    return {compute_dtype(torch.device(s["device"])) for s in stats}


@dataclass
class FieldErrors:
    """How far a recomputed float field is from the stored one, over the compared positions."""

    compared: int = 0
    beyond_tolerance: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_position: int = -1

    def add_block(self, live: torch.Tensor, stored: torch.Tensor, positions: torch.Tensor, eps: float) -> None:
        """Compare `[P, D]` rows taken at `positions`.

        A value is within tolerance when |live - stored| <= ULPS·eps·(|stored| + m), m being the
        largest |value| at its position. The relative part is the rounding of the value itself. The
        absolute part is there because a value near zero comes out of sums of terms as large as
        its position's largest ones, so its error scales with m, not with itself. ULPS = 4 leaves
        room for the stored value's rounding (half a unit), the recomputation's own rounding, and
        the reordered sums of a batch of another shape.
        """
        live, stored = live.float(), stored.float()
        # A NaN error counts as infinite, so it is reported and never hidden by a max.
        diff = (live - stored).abs().nan_to_num(nan=math.inf)
        scale = stored.abs().amax(dim=-1, keepdim=True)
        # `~(diff <= tol)` rather than `diff > tol`: a NaN tolerance (NaN stored) must not pass.
        beyond = ~(diff <= TOLERANCE_ULPS * eps * (stored.abs() + scale))
        per_position = (diff / scale.clamp_min(torch.finfo(torch.float32).tiny)).amax(dim=-1).nan_to_num(nan=math.inf)
        worst = int(per_position.argmax())
        if self.worst_position < 0 or float(per_position[worst]) > self.max_rel:
            self.max_rel, self.worst_position = float(per_position[worst]), int(positions[worst])
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.compared += diff.numel()
        self.beyond_tolerance += int(beyond.sum())


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
    eps: float,
) -> SampleComparison:
    """Exact fields position by position; float fields within tolerance where both say attention_mask is 1."""
    mismatches = {
        name: int((live[name] != stored[name]).reshape(live[name].shape[0], -1).any(dim=-1).sum())
        for name in EXACT_FIELDS
    }
    content = torch.nonzero(live["attention_mask"].bool() & stored["attention_mask"].bool()).flatten()
    errors = {name: FieldErrors() for name in FLOAT_FIELDS}
    for start in range(0, len(content), PARITY_POSITION_BLOCK):
        positions = content[start : start + PARITY_POSITION_BLOCK]
        for name, field_errors in errors.items():
            field_errors.add_block(
                comparable_rows(live, name, positions, draft_vocab_size),
                comparable_rows(stored, name, positions, draft_vocab_size),
                positions,
                eps,
            )
    shard, row = divmod(sample, shard_size)
    positions = stored["input_ids"].shape[0]
    return SampleComparison(sample, shard, row, positions, int(stored["loss_mask"].sum()), mismatches, errors)


def stored_sample(cache_dir: Path, shard_size: int, sample: int) -> dict[str, torch.Tensor]:
    """One sample's stored fields, read from its shard."""
    shard, row = divmod(sample, shard_size)
    return {name: values[0] for name, values in read_shard_rows(cache_dir / shard_file_name(shard), [row]).items()}


def recomputed_comparisons(
    model: nn.Module, manifest: Mapping[str, Any], inputs: ValidationInputs, samples: list[int], eps: float
) -> list[SampleComparison]:
    """Run the target on `samples` through the shards' own function and compare with the cache.

    One sample per forward: the target runs on no padding, and each row is recomputed in another
    batch than the shard job's, as a row's content must not depend on its batch.
    """
    spec = cache_spec(manifest)
    shard_size = int(manifest["shard_size"])
    comparisons = []
    for sample in samples:
        live = compute_cache_batch(model, spec, read_token_rows(inputs.tokenized, [sample])).cpu().padded()
        live_sample = {name: values[0] for name, values in live.items()}
        stored = stored_sample(inputs.cache_dir, shard_size, sample)
        comparisons.append(compare_sample(sample, shard_size, live_sample, stored, spec.draft_vocab_size, eps))
    return comparisons


def allowed_position_mask_flips(supervised_positions: int, compute_dtypes: set[torch.dtype]) -> int:
    """Zero when every computation ran in fp32; else a small share of the supervised positions (near ties)."""
    if compute_dtypes <= {torch.float32}:
        return 0
    return math.floor(MAX_NEAR_TIE_FLIP_SHARE * supervised_positions)


def parity_check(
    open_target: Callable[[], ContextManager[nn.Module]],
    manifest: Mapping[str, Any],
    inputs: ValidationInputs,
    stats: Sequence[Mapping[str, Any]],
) -> CheckResult:
    """Recompute `inputs.num_samples` samples with the live target and compare them with the cache."""
    samples = parity_sample_indices(
        int(manifest["num_samples"]), int(manifest["shard_size"]), inputs.num_samples, inputs.seed
    )
    if not samples:
        return CheckResult("parity", True, "not run: validation.num_samples is 0", {"samples_checked": 0})
    started = time.perf_counter()
    with open_target() as model:
        load_seconds = time.perf_counter() - started
        compute_dtypes = shard_compute_dtypes(stats) | {next(model.parameters()).dtype}
        eps = parity_eps(DTYPES[manifest["dtype"]], compute_dtypes)
        comparisons = recomputed_comparisons(model, manifest, inputs, samples, eps)
    allowed_flips = allowed_position_mask_flips(sum(c.supervised_positions for c in comparisons), compute_dtypes)
    return parity_result(comparisons, eps, allowed_flips, load_seconds)


def parity_problems(comparisons: Sequence[SampleComparison], eps: float, allowed_flips: int) -> list[str]:
    """One line per sample and field that differs beyond what is allowed."""
    problems = []
    for c in comparisons:
        where = f"sample {c.sample} ({shard_file_name(c.shard)} row {c.row})"
        for name, count in c.mismatches.items():
            if count and not (name == "position_mask" and allowed_flips):
                problems.append(f"{where}: {name} differs at {count} position(s)")
        for name, errors in c.errors.items():
            if errors.beyond_tolerance:
                problems.append(
                    f"{where}: {name}: {errors.beyond_tolerance} of {errors.compared} values beyond tolerance; "
                    f"largest error {errors.max_abs:.3g}, worst at position {errors.worst_position}: "
                    f"{errors.max_rel:.3g} of its largest |value| (at most {2 * TOLERANCE_ULPS * eps:.3g} tolerated)"
                )
    flips = sum(c.mismatches["position_mask"] for c in comparisons)
    if allowed_flips and flips > allowed_flips:
        problems.append(f"position_mask differs at {flips} positions, more than the {allowed_flips} near ties allowed")
    return problems


def parity_result(
    comparisons: Sequence[SampleComparison], eps: float, allowed_flips: int, load_seconds: float
) -> CheckResult:
    """The parity figures: per field, the largest errors over every sample checked."""
    fields = [
        {
            "field": name,
            "rule": "within tolerance",
            "compared": sum(c.errors[name].compared for c in comparisons),
            "differing": sum(c.errors[name].beyond_tolerance for c in comparisons),
            "max_abs_error": max(c.errors[name].max_abs for c in comparisons),
            "max_rel_error": max(c.errors[name].max_rel for c in comparisons),
        }
        for name in FLOAT_FIELDS
    ] + [
        {
            "field": name,
            "rule": "exact",
            "compared": sum(c.positions for c in comparisons),
            "differing": sum(c.mismatches[name] for c in comparisons),
            "max_abs_error": None,
            "max_rel_error": None,
        }
        for name in EXACT_FIELDS
    ]
    samples = [{"sample": c.sample, "shard": c.shard, "row": c.row} for c in comparisons]
    problems = parity_problems(comparisons, eps, allowed_flips)
    figures = {
        "samples_checked": len(comparisons),
        "eps": eps,
        "tolerance": f"|Δ| ≤ {TOLERANCE_ULPS}·eps·(|value| + largest |value| at its position)",
        "position_mask_flips_allowed": allowed_flips,
        "model_load_seconds": load_seconds,
    }
    ids = ", ".join(str(c.sample) for c in comparisons)
    if problems:
        summary = problems_summary(problems)
    else:
        summary = f"{len(comparisons)} samples ({ids}) recomputed by the live target match the cache"
    return CheckResult("parity", not problems, summary, figures, {"fields": fields, "samples": samples}, problems)


# --- 3. Numerically sane, and the cache scan that 3 and 4 share --------------------------------


def probability_sum_tolerance(cache_dtype: torch.dtype) -> float:
    """How far from 1 a stored distribution may sum.

    Rounding each probability to the cache dtype moves the sum by at most eps/2 (the values are
    positive and sum to 1); the fp32 softmax and the fp32 re-summation here add ~1e-6 even over a
    256k vocabulary.
    """
    return torch.finfo(cache_dtype).eps + 1e-5


def rows_per_read(layout: ShardLayout) -> int:
    """How many samples the scan reads at a time."""
    return max(1, READ_BUDGET_BYTES // sum(f.sample_bytes for f in layout.fields()))


@dataclass
class CacheScan:
    """Counts gathered by reading every sample of every shard once."""

    draft_vocab_size: int
    sum_tolerance: float
    samples_scanned: int = 0
    unreadable: list[str] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)
    probability_rows_off: int = 0
    max_probability_sum_error: float = 0.0
    invalid_topk_positions: int = 0
    position_mask_outside_loss: int = 0
    padding_positions_not_zero: int = 0
    rows_unlike_tokenized: list[int] = field(default_factory=list)
    total_positions: int = 0
    supervised_positions: int = 0
    in_draft_positions: int = 0

    def add(self, first_sample: int, stored: Mapping[str, torch.Tensor], tokens: TokenBlock) -> None:
        """Fold in `[n, S, ...]` stored rows starting at `first_sample`, and their tokenized rows."""
        content = stored["attention_mask"].bool()
        loss = stored["loss_mask"].bool()
        position_mask = stored["position_mask"].squeeze(-1)
        self.samples_scanned += content.shape[0]
        self.add_extremes(stored, content)
        self.add_probability_sums(stored, content)
        self.position_mask_outside_loss += int((position_mask & ~loss).sum())
        unlike = rows_unlike_tokenized(stored, tokens)
        self.rows_unlike_tokenized += [first_sample + int(row) for row in unlike]
        self.total_positions += content.numel()
        self.supervised_positions += int(loss.sum())
        self.in_draft_positions += int(position_mask.sum())

    def add_extremes(self, stored: Mapping[str, torch.Tensor], content: torch.Tensor) -> None:
        """NaN/Inf in the computed fields, and padding positions that are not all zeros.

        Both come from each position's largest and smallest value (NaN propagates through them), two
        reductions that cost a fraction of an elementwise `isfinite`; values are counted one by one
        only at the positions found bad.
        """
        nonzero = torch.zeros_like(content)
        for name, values in stored.items():
            if values.dim() < 3:  # ids and masks: compared with the tokenized store
                continue
            comparable = values.to(torch.uint8) if values.dtype == torch.bool else values
            high, low = comparable.amax(dim=-1), comparable.amin(dim=-1)
            nonzero |= (high != 0) | (low != 0)
            if values.is_floating_point():
                bad = ~(torch.isfinite(high) & torch.isfinite(low))
                found = int((~torch.isfinite(values[bad])).sum()) if bad.any() else 0
                self.nonfinite[name] = self.nonfinite.get(name, 0) + found
        self.padding_positions_not_zero += int((nonzero & ~content).sum())

    def add_probability_sums(self, stored: Mapping[str, torch.Tensor], content: torch.Tensor) -> None:
        """Each content position's distribution must sum to 1 (top-k: with distinct in-range indices).

        Summing the top-k values equals summing their reconstruction exactly when the indices are
        distinct and in range, which is checked instead of materialising `[n, S, draft vocab]`.
        """
        if "target_probs_values" in stored:
            sums = stored["target_probs_values"].sum(dim=-1, dtype=torch.float32)
            indices = stored["target_probs_indices"].sort(dim=-1).values
            valid = (indices[..., 0] >= 0) & (indices[..., -1] < self.draft_vocab_size)
            valid &= (indices.diff(dim=-1) > 0).all(dim=-1)
            self.invalid_topk_positions += int((~valid & content).sum())
        else:
            sums = stored["target_probs"].sum(dim=-1, dtype=torch.float32)
        error = (sums[content] - 1).abs()
        if error.numel():
            self.max_probability_sum_error = max(
                self.max_probability_sum_error, float(error.nan_to_num(math.inf).max())
            )
        self.probability_rows_off += int((~(error <= self.sum_tolerance)).sum())


def rows_unlike_tokenized(stored: Mapping[str, torch.Tensor], tokens: TokenBlock) -> torch.Tensor:
    """Rows whose ids and masks are not the tokenized rows as the target shift makes them."""
    expected = {
        "input_ids": shifted_left(tokens.input_ids),
        "attention_mask": tokens.attention_mask,
        "loss_mask": shifted_left(tokens.loss_mask),
    }
    unlike = torch.zeros(tokens.input_ids.shape[0], dtype=torch.bool)
    for name, values in expected.items():
        unlike |= (stored[name] != values).any(dim=-1)
    return torch.nonzero(unlike).flatten()


def scan_cache(cache_dir: Path, manifest: Mapping[str, Any], tokenized: Path) -> CacheScan:
    """Read every sample of every shard once, a few rows at a time, and gather the scan's counts."""
    layout = ShardLayout.from_manifest(manifest)
    scan = CacheScan(layout.draft_vocab_size, probability_sum_tolerance(DTYPES[layout.dtype]))
    shard_size, step = int(manifest["shard_size"]), rows_per_read(layout)
    for shard, record in enumerate(manifest["shards"]):
        first = shard * shard_size
        try:
            for start in range(0, int(record["num_samples"]), step):
                stop = min(start + step, int(record["num_samples"]))
                stored = read_shard_block(cache_dir / record["file"], start, stop)
                scan.add(first + start, stored, read_token_block(tokenized, first + start, first + stop))
        except Exception as error:  # a damaged shard is a finding of the scan; the other shards still count
            scan.unreadable.append(f"{record['file']}: {error}")
    return scan


def sanity_check(scan: CacheScan, num_samples: int) -> CheckResult:
    """No NaN or Inf, distributions that sum to 1, position_mask inside the loss mask, zeros in the padding."""
    problems = [f"unreadable: {reason}" for reason in scan.unreadable]
    problems += [f"{name}: {count} NaN or Inf values" for name, count in scan.nonfinite.items() if count]
    if scan.probability_rows_off:
        problems.append(
            f"target_probs: {scan.probability_rows_off} positions do not sum to 1 within {scan.sum_tolerance:.2g} "
            f"(worst off by {scan.max_probability_sum_error:.3g})"
        )
    if scan.invalid_topk_positions:
        problems.append(
            f"target_probs_indices: {scan.invalid_topk_positions} positions with repeated or out-of-range indices"
        )
    if scan.position_mask_outside_loss:
        problems.append(
            f"position_mask set at {scan.position_mask_outside_loss} positions outside the shifted loss_mask"
        )
    if scan.padding_positions_not_zero:
        problems.append(f"{scan.padding_positions_not_zero} padding positions (attention_mask 0) hold nonzero values")
    if scan.rows_unlike_tokenized:
        problems.append(
            f"{len(scan.rows_unlike_tokenized)} samples whose ids or masks are not the tokenized rows shifted: "
            + listed(scan.rows_unlike_tokenized)
        )
    if scan.samples_scanned != num_samples and not scan.unreadable:
        problems.append(f"scanned {scan.samples_scanned} samples, the manifest has {num_samples}")
    figures = {
        "samples_scanned": scan.samples_scanned,
        "nonfinite_values": sum(scan.nonfinite.values()),
        "max_probability_sum_error": scan.max_probability_sum_error,
        "probability_sum_tolerance": scan.sum_tolerance,
        "position_mask_outside_loss": scan.position_mask_outside_loss,
        "padding_positions_not_zero": scan.padding_positions_not_zero,
        "samples_unlike_tokenized": len(scan.rows_unlike_tokenized),
    }
    if problems:
        return CheckResult("sanity", False, problems_summary(problems), figures, details=problems)
    summary = (
        f"{scan.samples_scanned} samples: no NaN/Inf, distributions sum to 1 (worst {scan.max_probability_sum_error:.2g}), "
        "position_mask inside the loss mask, padding zero, ids and masks equal the tokenized rows"
    )
    return CheckResult("sanity", True, summary, figures)


# --- 4. Supervision ----------------------------------------------------------------------------


def supervision_check(scan: CacheScan, info: TokenizedInfo) -> CheckResult:
    """How much of the cache trains the draft, and which samples are cut or teach nothing."""
    truncated = np.flatnonzero(info.truncated).tolist()
    unsupervised = np.flatnonzero(info.num_supervised == 0).tolist()
    in_draft_share = scan.in_draft_positions / scan.supervised_positions if scan.supervised_positions else 0.0
    figures = {
        "total_positions": scan.total_positions,
        "real_tokens": int(info.lengths.sum()),
        "supervised_tokens": int(info.num_supervised.sum()),
        "supervised_positions": scan.supervised_positions,
        "supervised_share": scan.supervised_positions / scan.total_positions if scan.total_positions else 0.0,
        "in_draft_positions": scan.in_draft_positions,
        "in_draft_share": in_draft_share,
        "truncated_samples": len(truncated),
        "unsupervised_samples": len(unsupervised),
    }
    series = {"truncated_samples": truncated[:MAX_LISTED], "unsupervised_samples": unsupervised[:MAX_LISTED]}
    details = []
    if truncated:
        details.append(f"{len(truncated)} samples truncated at seq_length {info.seq_length}: {listed(truncated)}")
    if unsupervised:
        details.append(
            f"{len(unsupervised)} samples with no supervised token (cost disk, train nothing): {listed(unsupervised)}"
        )
    share_text = f"{in_draft_share:.1%} of supervised positions have their target top-1 in the draft vocabulary"
    if not scan.supervised_positions:
        return CheckResult("supervision", False, "no supervised position in the whole cache", figures, series, details)
    if in_draft_share < MIN_DRAFT_SHARE:
        summary = f"only {share_text} (below {MIN_DRAFT_SHARE:.0%}): draft_vocab_size is too small for this data"
        return CheckResult("supervision", False, summary, figures, series, details)
    summary = f"{scan.supervised_positions:,} supervised positions; {share_text}"
    return CheckResult("supervision", True, summary, figures, series, details)


# --- 5. Draft vocabulary -----------------------------------------------------------------------


def coverage_curve(counts: np.ndarray, marked_size: int, points: int = 200) -> list[list[float]]:
    """`[size, share]` points: the share of supervised tokens the `size` most frequent ids cover.

    Sizes are spaced evenly on a log scale (and include `marked_size`), so a 150k-id vocabulary
    needs a few hundred points, not one per id.
    """
    covered = np.cumsum(np.sort(counts)[::-1]) / max(int(counts.sum()), 1)
    sizes = np.unique(np.round(np.logspace(0, math.log10(len(counts)), points)).astype(np.int64))
    sizes = np.union1d(sizes, [min(max(marked_size, 1), len(counts))])
    return [[int(size), float(covered[size - 1])] for size in sizes]


def vocabulary_check(counts: np.ndarray, manifest: Mapping[str, Any], selection: Path) -> CheckResult:
    """Coverage of the supervised tokens by the draft vocabulary, and that the manifest's is the one selected."""
    selected, _ = read_vocab_selection(selection)
    size = int(manifest["draft_vocab_size"])
    total = int(counts.sum())
    covered = int(counts[selected.numpy()].sum())
    ranked = np.cumsum(np.sort(counts)[::-1])
    figures = {
        "target_vocab_size": int(manifest["target_vocab_size"]),
        "draft_vocab_size": size,
        "distinct_supervised_tokens": int((counts > 0).sum()),
        "coverage_share": covered / total if total else 0.0,
        "best_coverage_at_size_share": float(ranked[size - 1] / total) if total else 0.0,
        "ids_for_95_percent": int(np.searchsorted(ranked, 0.95 * total) + 1) if total else 0,
        "ids_for_99_percent": int(np.searchsorted(ranked, 0.99 * total) + 1) if total else 0,
    }
    series = {"coverage_curve": coverage_curve(counts, size)}
    problems = []
    if selected.tolist() != list(manifest["selected_token_ids"]):
        problems.append(
            "manifest.json's selected_token_ids differ from vocab_selection.pt: the cache used another selection"
        )
    if not total:
        problems.append("vocab_counts.npy counts no supervised token")
    elif covered / total < MIN_DRAFT_SHARE:
        problems.append(f"the draft vocabulary covers only {covered / total:.1%} of the supervised tokens")
    if problems:
        return CheckResult("vocabulary", False, problems[0], figures, series, problems)
    summary = (
        f"{size:,} of {figures['target_vocab_size']:,} ids cover {covered / total:.2%} of {total:,} supervised tokens"
    )
    return CheckResult("vocabulary", True, summary, figures, series)


# --- 6. Disk -----------------------------------------------------------------------------------


def shard_bytes_by_layout(layout: ShardLayout, num_samples: int) -> int:
    """A shard's size as its layout predicts it: header plus every field's bytes."""
    header, _ = safetensors_header(layout, num_samples)
    return len(header) + num_samples * sum(f.sample_bytes for f in layout.fields())


def disk_check(cache_dir: Path, manifest: Mapping[str, Any], info: TokenizedInfo) -> CheckResult:
    """Bytes per sample and per field, padding's share, and the size of a larger dataset of the same shape."""
    layout = ShardLayout.from_manifest(manifest)
    n = int(manifest["num_samples"])
    field_bytes = {f.name: f.sample_bytes for f in layout.fields()}
    per_sample = sum(field_bytes.values())
    records = manifest["shards"]
    unexplained = [
        r["file"] for r in records if shard_bytes_by_layout(layout, int(r["num_samples"])) != int(r["bytes"])
    ]
    shard_bytes = sum(int(r["bytes"]) for r in records)
    embeddings = cache_dir / EMBEDDINGS_FILE
    embeddings_bytes = embeddings.stat().st_size if embeddings.exists() else 0
    padding_share = 1 - float(info.lengths.sum()) / (n * layout.seq_length)
    figures = {
        "num_samples": n,
        "shards": len(records),
        "per_sample_bytes": per_sample,
        "shard_bytes": shard_bytes,
        "embeddings_bytes": embeddings_bytes,
        "total_bytes": shard_bytes + embeddings_bytes,
        "allocated_bytes": allocated_bytes([cache_dir / r["file"] for r in records] + [embeddings]),
        "padding_share": padding_share,
        "padding_bytes": round(padding_share * n * per_sample),
        **{
            f"projected_{name}_samples_bytes": count * per_sample + embeddings_bytes
            for name, count in PROJECTED_SAMPLES.items()
        },
    }
    series = {
        "fields": [
            {"field": name, "per_sample_bytes": size, "total_bytes": size * n, "of_the_cache_share": size / per_sample}
            for name, size in field_bytes.items()
        ]
    }
    if unexplained:
        summary = (
            f"{len(unexplained)} shard(s) whose recorded size the layout does not explain: {', '.join(unexplained)}"
        )
        return CheckResult("disk", False, summary, figures, series, [summary])
    summary = (
        f"{format_bytes(shard_bytes + embeddings_bytes)} in all ({format_bytes(figures['allocated_bytes'])} allocated), "
        f"{format_bytes(per_sample)} per sample, {padding_share:.1%} of positions are padding"
    )
    return CheckResult("disk", True, summary, figures, series)


def allocated_bytes(paths: Sequence[Path]) -> int:
    """Disk blocks the files take: less than their size where the never-written padding stays a sparse hole.

    A copy that does not keep holes (object storage, `rsync` without `-S`) takes the full size.
    """
    return sum(path.stat().st_blocks * 512 for path in paths if path.exists())


# --- 7. Cost -----------------------------------------------------------------------------------


def read_benchmark(path: Path) -> dict[str, float | None]:
    """The first row of a Snakemake benchmark file (`s`, `max_rss` in MB, ...); "NA" becomes None."""
    with open(path, newline="") as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    return {key: None if value in ("NA", "-", "") else float(value) for key, value in row.items() if key != "h:m:s"}


def shard_index_of(path: Path) -> int:
    """The 6-digit shard index in a per-shard file's name."""
    match = re.search(r"(\d{6})", path.name)
    if match is None:
        raise ValueError(f"{path}: no 6-digit shard index in the name")
    return int(match.group(1))


def shard_cost_row(stats: Mapping[str, Any], benchmark: Mapping[str, float | None] | None) -> dict[str, Any]:
    """One shard job's time and throughput."""
    seconds = stats["seconds"]
    total, load = float(seconds.get("total", 0.0)), float(seconds.get("load", 0.0))
    return {
        "shard": stats["shard"],
        "samples": stats["num_samples"],
        "job_seconds": total,
        "load_seconds": load,
        "forward_seconds": float(seconds.get("forward", 0.0)),
        "write_seconds": float(seconds.get("write", 0.0)),
        "real_tokens": stats["real_tokens"],
        "tokens_per_second": stats["real_tokens"] / total if total else 0.0,
        "load_share": load / total if total else 0.0,
        # The part of the padded [samples, seq_length] grid the target ran on; trimming skipped the rest.
        "positions_computed_share": (
            stats["computed_tokens"] / stats["padded_tokens"] if stats["padded_tokens"] else 0.0
        ),
        "benchmark_seconds": benchmark.get("s") if benchmark else None,
        "max_rss_mb": benchmark.get("max_rss") if benchmark else None,
        "device": stats.get("device"),
    }


def cost_check(stats: Sequence[Mapping[str, Any]], benchmarks: Sequence[Path], shard_count: int) -> CheckResult:
    """Per shard job: wall time, model load, tokens per second, and Snakemake's benchmark when present."""
    by_shard = {shard_index_of(path): read_benchmark(path) for path in benchmarks if path.exists()}
    rows = [shard_cost_row(s, by_shard.get(s["shard"])) for s in sorted(stats, key=lambda s: s["shard"])]
    job_seconds = sum(r["job_seconds"] for r in rows)
    load_seconds = sum(r["load_seconds"] for r in rows)
    real_tokens = sum(r["real_tokens"] for r in rows)
    computed, padded = sum(s["computed_tokens"] for s in stats), sum(s["padded_tokens"] for s in stats)
    figures = {
        "shard_jobs": len(rows),
        "job_seconds": job_seconds,
        "load_seconds": load_seconds,
        "load_share": load_seconds / job_seconds if job_seconds else 0.0,
        "tokens_per_second": real_tokens / job_seconds if job_seconds else 0.0,
        "positions_computed_share": computed / padded if padded else 0.0,
        "max_rss_mb": max((r["max_rss_mb"] for r in rows if r["max_rss_mb"] is not None), default=None),
    }
    missing = sorted(set(range(shard_count)) - {r["shard"] for r in rows})
    if missing:
        summary = f"no stats for {len(missing)} shard(s): {listed(missing)}"
        return CheckResult("cost", False, summary, figures, {"shards": rows}, [summary])
    summary = (
        f"{len(rows)} shard jobs, {format_seconds(job_seconds)} in all, {figures['tokens_per_second']:,.0f} real tokens/s; "
        f"model loading is {figures['load_share']:.0%} of job time"
    )
    return CheckResult("cost", True, summary, figures, {"shards": rows})


# --- 8. Provenance -----------------------------------------------------------------------------

REQUIRED_PROVENANCE = (
    "target_model_identity",
    "tokenizer_sha256",
    "chat_template_sha256",
    "settings_fingerprint",
    "producer",
    "packages",
)
SETTING_KEYS = (
    "target_model",
    "revision",
    "trust_remote_code",
    "input_data",
    "split",
    "shuffle_seed",
    "seq_length",
    "dtype",
    "shard_size",
    "num_samples",
    "target_vocab_size",
    "draft_vocab_size",
    "target_probs_topk",
    "aux_layer_ids",
    "aux_hidden_dim",
    "mask_reasoning_content",
    "mask_generation_prompt",
    "format_version",
    "settings_fingerprint",
)


def provenance_disagreements(
    manifest: Mapping[str, Any], info: TokenizedInfo, stats: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Where the manifest's record of its origin disagrees with the tokenized store or the shard stats."""
    problems = []
    if manifest.get("tokenizer_sha256") != info.tokenizer_hash:
        problems.append(
            "tokenizer_sha256 differs from the tokenized store's: shards and tokens come from different tokenizers"
        )
    if manifest.get("chat_template_sha256") != info.chat_template_hash:
        problems.append("chat_template_sha256 differs from the tokenized store's")
    for key in ("input_data", "split", "shuffle_seed"):
        if manifest.get(key) != info.source.get(key):
            problems.append(f"{key} is {manifest.get(key)!r}, the tokenized store says {info.source.get(key)!r}")
    for s in stats:
        if s["model_identity"] != manifest.get("target_model_identity"):
            problems.append(f"{shard_file_name(s['shard'])} was computed by another target: {s['model_identity']}")
        if s["settings_fingerprint"] != manifest.get("settings_fingerprint"):
            problems.append(f"{shard_file_name(s['shard'])} was computed under other settings")
    return problems


def provenance_check(
    manifest: Mapping[str, Any], info: TokenizedInfo, stats: Sequence[Mapping[str, Any]]
) -> CheckResult:
    """Target, tokenizer, data, settings, packages and producer, as the manifest records them."""
    identity = manifest.get("target_model_identity") or {}
    figures = {
        "target_model": manifest.get("target_model"),
        "revision": manifest.get("revision"),
        "commit": identity.get("commit"),
        "config_sha256": identity.get("config_sha256"),
        "weight_files_sha256": identity.get("weight_files_sha256"),
        "tokenizer_sha256": manifest.get("tokenizer_sha256"),
        "chat_template_sha256": manifest.get("chat_template_sha256"),
        "producer": manifest.get("producer"),
        "packages": manifest.get("packages"),
    }
    series = {"settings": [{"setting": key, "value": manifest.get(key)} for key in SETTING_KEYS]}
    problems = [f"the manifest does not record {key}" for key in REQUIRED_PROVENANCE if not manifest.get(key)]
    problems += provenance_disagreements(manifest, info, stats)
    details = list(problems)
    built_under = (manifest.get("producer") or {}).get("cache_semantics_version")
    if built_under is not None and built_under != CACHE_SEMANTICS_VERSION:
        details.append(
            f"built under cache semantics {built_under}, this validator's are {CACHE_SEMANTICS_VERSION}: "
            "live parity compares against today's computation"
        )
    if problems:
        return CheckResult("provenance", False, problems_summary(problems), figures, series, details)
    summary = f"{manifest['target_model']} ({identity.get('commit') or 'local'}), tokenizer and template hashed, all settings recorded"
    return CheckResult("provenance", True, summary, figures, series, details)


# --- Running the checks ------------------------------------------------------------------------


def run_check(key: str, check: Callable[[], CheckResult]) -> CheckResult:
    """`check()`, timed; if it cannot run, a failed result saying why."""
    started = time.perf_counter()
    try:
        result = check()
    except Exception as error:  # a check that cannot run is a failure to report, not a reason to write no report
        log.exception("check %r could not run", key)
        result = CheckResult(key, False, f"could not run: {type(error).__name__}: {error}", details=[str(error)])
    seconds = time.perf_counter() - started
    log.info("%s: %s in %.1fs: %s", TITLES[key], "PASS" if result.passed else "FAIL", seconds, result.summary)
    return replace(result, seconds=seconds)


def read_stats(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The shard stats files that exist (a missing one is the cost check's finding)."""
    return [json.loads(Path(p).read_text()) for p in paths if Path(p).exists()]


def validate_cache(inputs: ValidationInputs, open_target: Callable[[], ContextManager[nn.Module]]) -> ValidationReport:
    """Run every check on one run's cache. `open_target()` yields the target model for the parity check."""
    manifest = functools.cache(lambda: read_manifest(inputs.cache_dir))
    info = functools.cache(lambda: read_tokenized_info(inputs.tokenized))
    scan = functools.cache(lambda: scan_cache(inputs.cache_dir, manifest(), inputs.tokenized))
    stats = read_stats(inputs.stats)
    checks = [
        run_check("integrity", lambda: integrity_check(inputs.cache_dir)),
        run_check("parity", lambda: parity_check(open_target, manifest(), inputs, stats)),
        run_check("sanity", lambda: sanity_check(scan(), int(manifest()["num_samples"]))),
        run_check("supervision", lambda: supervision_check(scan(), info())),
        run_check("vocabulary", lambda: vocabulary_check(np.load(inputs.counts), manifest(), inputs.selection)),
        run_check("disk", lambda: disk_check(inputs.cache_dir, manifest(), info())),
        run_check("cost", lambda: cost_check(stats, inputs.benchmarks, len(inputs.stats))),
        run_check("provenance", lambda: provenance_check(manifest(), info(), stats)),
    ]
    generated_at = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return ValidationReport(inputs.run, str(inputs.cache_dir), checks, generated_at)


def failed_path(path: Path) -> Path:
    """Where a failed validation keeps its report: beside the output, under a name Snakemake does not own."""
    return path.with_name(f"{path.stem}.FAILED{path.suffix}")


def write_report(report: ValidationReport, html_path: Path, json_path: Path, strict: bool) -> Path | None:
    """Write the HTML and JSON reports; returns the kept path when `strict` and a check failed.

    A strict failure writes them under `*.FAILED.*` names, which survive the failed job (Snakemake
    deletes a failed job's declared outputs). A success removes such leftovers of an earlier failure.
    """
    failed_strictly = strict and not report.passed
    html_target = failed_path(html_path) if failed_strictly else html_path
    json_target = failed_path(json_path) if failed_strictly else json_path
    with atomic_output(html_target) as tmp:
        tmp.write_text(render_html(report), encoding="utf-8")
    write_json_atomic(json_target, report.to_json())
    if failed_strictly:
        return html_target
    for leftover in (failed_path(html_path), failed_path(json_path)):
        leftover.unlink(missing_ok=True)
    return None


def failure_message(report: ValidationReport, kept: Path) -> str:
    """What a strict failure tells the user."""
    return (
        f"validation of run {report.run!r} failed: {', '.join(report.failed_titles)}. "
        f"The report is kept at {kept}; fix the cache (or set validation.strict: false to accept it with the failure marked)."
    )


# --- Rendering: formatting -----------------------------------------------------------------------


def format_bytes(size: float) -> str:
    """`1.23 GB` (decimal units, as disks are sold)."""
    units = ("B", "kB", "MB", "GB", "TB", "PB")
    power = 0
    while abs(size) >= 1000 and power < len(units) - 1:
        size /= 1000
        power += 1
    return f"{size:,.0f} B" if power == 0 else f"{size:.3g} {units[power]}"


def format_seconds(seconds: float) -> str:
    """`12 ms`, `42.0 s`, `3.5 min`, `2.1 h`."""
    if seconds < 0.1:
        return f"{seconds * 1000:.2g} ms"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def format_value(name: str, value: Any) -> str:
    """A figure as text, by the unit its name ends with."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if is_number(value):
        if name.endswith("_bytes"):
            return format_bytes(value)
        if name.endswith("_share"):
            return f"{value:.2%}"
        if name.endswith("_seconds"):
            return format_seconds(value)
        return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) if value else "—"
    return str(value)


def label(name: str) -> str:
    """`max_rss_mb` -> `max rss mb`: a figure's name as a column or row label."""
    return name.replace("_", " ")


# --- Rendering: HTML ------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232b;
       margin: 0 auto; max-width: 1100px; padding: 24px; background: #fafbfc; }
h1 { font-size: 24px; margin: 0 0 6px; } h2 { font-size: 18px; margin: 0 0 8px; }
header.verdict { padding: 18px 22px; border-radius: 8px; color: #fff; margin-bottom: 20px; }
header.pass { background: #1f7a3f; } header.fail { background: #b42318; }
header p { margin: 4px 0; } header .meta { opacity: .85; font-size: 12px; word-break: break-all; }
section { background: #fff; border: 1px solid #dde2e8; border-radius: 8px; padding: 16px 20px; margin-bottom: 16px; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid #edf0f3; vertical-align: top; }
th { font-weight: 600; color: #4a5563; }
td.num { text-align: right; } td.nowrap { white-space: nowrap; }
.badge { display: inline-block; min-width: 44px; text-align: center; font-weight: 700; font-size: 12px;
         padding: 2px 8px; border-radius: 10px; color: #fff; }
.badge.pass { background: #1f7a3f; } .badge.fail { background: #b42318; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; background: none; border: none; padding: 0; }
.card { background: #fff; border: 1px solid #dde2e8; border-radius: 8px; padding: 10px 14px; min-width: 150px; flex: 1; }
.card .value { font-size: 20px; font-weight: 650; } .card .name { color: #5b6673; font-size: 12px; }
.summary-line { margin: 0 0 8px; }
ul.details { margin: 6px 0; padding-left: 20px; } ul.details li { margin: 2px 0; word-break: break-word; }
section.failed { border-color: #e8a29a; }
svg { display: block; margin: 8px 0; max-width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #4a5563; }
details summary { cursor: pointer; color: #2457a6; margin: 6px 0; }
code { font-size: 12px; }
"""

# The headline numbers under the verdict: (check, figure, label).
HEADLINE = (
    ("disk", "num_samples", "samples"),
    ("disk", "total_bytes", "cache size"),
    ("disk", "per_sample_bytes", "per sample"),
    ("supervision", "supervised_positions", "supervised positions"),
    ("supervision", "in_draft_share", "target top-1 in draft vocab"),
    ("vocabulary", "coverage_share", "supervised tokens covered"),
    ("disk", "padding_share", "padding"),
    ("cost", "tokens_per_second", "real tokens/s in shard jobs"),
)


def render_html(report: ValidationReport) -> str:
    """The whole report as one self-contained HTML document."""
    verdict = "PASS" if report.passed else "FAIL"
    title = f"EAGLE-3 cache validation: {report.run}: {verdict}"
    body = "\n".join(
        [
            verdict_header(report),
            summary_table(report),
            headline_cards(report),
            *(check_section(check) for check in report.checks),
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
        f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def verdict_header(report: ValidationReport) -> str:
    if report.passed:
        state, headline = "pass", f"PASS: all {len(report.checks)} checks passed. This cache is fit to train on."
    else:
        failed = report.failed_titles
        state = "fail"
        headline = f"FAIL: {len(failed)} of {len(report.checks)} checks failed ({', '.join(failed)}). Do not train on this cache."
    meta = (
        f"cache {report.cache_dir} · validated {report.generated_at} in {format_seconds(report.seconds)} · "
        f"eagle3-cache {producer()['version']}"
    )
    return (
        f'<header class="verdict {state}"><h1>EAGLE-3 cache validation: {esc(report.run)}</h1>'
        f'<p><strong>{esc(headline)}</strong></p><p class="meta">{esc(meta)}</p></header>'
    )


def badge(passed: bool) -> str:
    return f'<span class="badge {"pass" if passed else "fail"}">{"PASS" if passed else "FAIL"}</span>'


def summary_table(report: ValidationReport) -> str:
    rows = "".join(
        f'<tr><td>{badge(c.passed)}</td><td class="nowrap"><a href="#{esc(c.key)}">{i}. {esc(c.title)}</a></td><td>{esc(c.summary)}</td></tr>'
        for i, c in enumerate(report.checks, start=1)
    )
    return f"<section><h2>Summary</h2><table>{rows}</table></section>"


def headline_cards(report: ValidationReport) -> str:
    cards = []
    for key, name, text in HEADLINE:
        check = report.check(key)
        if check is not None and name in check.figures:
            cards.append(
                f'<div class="card"><div class="value">{esc(format_value(name, check.figures[name]))}</div>'
                f'<div class="name">{esc(text)}</div></div>'
            )
    return f'<section class="cards">{"".join(cards)}</section>'


def check_section(check: CheckResult) -> str:
    number = list(TITLES).index(check.key) + 1
    parts = [
        f"<h2>{badge(check.passed)} {number}. {esc(check.title)}</h2>",
        f'<p class="summary-line">{esc(check.summary)}</p>',
    ]
    if check.details:
        parts.append('<ul class="details">' + "".join(f"<li>{esc(line)}</li>" for line in check.details) + "</ul>")
    if check.figures:
        parts.append(figures_table(check.figures))
    parts += SERIES_RENDERERS.get(check.key, render_series_tables)(check)
    state = "" if check.passed else ' class="failed"'
    return f'<section id="{esc(check.key)}"{state}>' + "".join(parts) + "</section>"


def figures_table(figures: Mapping[str, Any]) -> str:
    rows = []
    for name, value in figures.items():
        shown = figures_table(value) if isinstance(value, Mapping) else esc(format_value(name, value))
        rows.append(f"<tr><th>{esc(label(name))}</th><td>{shown}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def rows_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A list of dicts as a table, one column per key."""
    if not rows:
        return "<p>—</p>"
    columns = list(rows[0])
    numeric = {c for c in columns if all(is_number(row.get(c)) or row.get(c) is None for row in rows)}
    head = "".join(f"<th>{esc(label(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(cell(c, row.get(c), c in numeric) for c in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def cell(name: str, value: Any, numeric: bool) -> str:
    """A table cell; columns of numbers are right aligned so that their digits line up."""
    return f'<td{" class=num" if numeric else ""}>{esc(format_value(name, value))}</td>'


def render_series_tables(check: CheckResult) -> list[str]:
    """Every series as a table (lists of dicts) or a line of values."""
    parts = []
    for name, values in check.series.items():
        if values and isinstance(values[0], Mapping):
            parts.append(f"<h3>{esc(label(name))}</h3>{rows_table(values)}")
        elif values:
            parts.append(f"<p><strong>{esc(label(name))}:</strong> {esc(listed(values))}</p>")
    return parts


def render_vocabulary(check: CheckResult) -> list[str]:
    curve = check.series.get("coverage_curve", [])
    if not curve:
        return []
    size = check.figures["draft_vocab_size"]
    marked = next(point for point in curve if point[0] >= size)
    chart = svg_line_chart(
        curve,
        x_label="draft vocabulary size (most frequent ids first, log scale)",
        y_label="supervised tokens covered",
        marker=(marked[0], marked[1], f"draft_vocab_size {size:,}: {marked[1]:.1%}"),
    )
    return [f"<h3>coverage curve</h3>{chart}"]


def render_disk(check: CheckResult) -> list[str]:
    fields = check.series.get("fields", [])
    bars = [(row["field"], float(row["per_sample_bytes"])) for row in fields]
    chart = svg_bar_chart(bars, lambda value: f"{format_bytes(value)} / sample")
    return [f"<h3>bytes per sample, by field</h3>{chart}{rows_table(fields)}"]


def render_cost(check: CheckResult) -> list[str]:
    rows = check.series.get("shards", [])
    if not rows:
        return []
    chart = svg_column_chart([float(r["tokens_per_second"]) for r in rows], x_label="shard", y_label="real tokens / s")
    table = rows_table(rows)
    return [
        f"<h3>throughput per shard job</h3>{chart}<details><summary>per-shard table ({len(rows)} jobs)</summary>{table}</details>"
    ]


def render_provenance(check: CheckResult) -> list[str]:
    return [f"<h3>settings</h3>{rows_table(check.series.get('settings', []))}"]


SERIES_RENDERERS: dict[str, Callable[[CheckResult], list[str]]] = {
    "supervision": lambda check: [],  # its details already list the samples
    "vocabulary": render_vocabulary,
    "disk": render_disk,
    "cost": render_cost,
    "provenance": render_provenance,
}


# --- Rendering: SVG charts ----------------------------------------------------------------------

CHART_WIDTH, CHART_HEIGHT = 760, 300
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 24, 16, 44
LINE_COLOR, MARK_COLOR, BAR_COLOR, GRID_COLOR = "#2457a6", "#b42318", "#4f7cc4", "#e3e7ec"


def svg_document(width: int, height: int, content: Sequence[str]) -> str:
    return (
        f'<svg width="{width}" height="{height}" ' f'viewBox="0 0 {width} {height}" role="img">{"".join(content)}</svg>'
    )


def svg_text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{esc(text)}</text>'


def log_ticks(largest: float) -> list[int]:
    """1, 10, 100, ... up to `largest`."""
    return [10**power for power in range(int(math.log10(max(largest, 1))) + 1)]


def svg_line_chart(
    points: Sequence[Sequence[float]], *, x_label: str, y_label: str, marker: tuple[float, float, str]
) -> str:
    """A line over a log x axis and a 0..100% y axis, with one marked point."""
    plot_w = CHART_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = CHART_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    x_max = max(math.log10(max(p[0] for p in points)), 1e-9)

    def x_of(size: float) -> float:
        return MARGIN_LEFT + plot_w * math.log10(max(size, 1)) / x_max

    def y_of(share: float) -> float:
        return MARGIN_TOP + plot_h * (1 - share)

    content = []
    for share in (0, 0.25, 0.5, 0.75, 1):
        y = y_of(share)
        content.append(
            f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID_COLOR}"/>'
        )
        content.append(svg_text(MARGIN_LEFT - 6, y + 4, f"{share:.0%}", "end"))
    for tick in log_ticks(10**x_max):
        x = x_of(tick)
        content.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN_TOP}" y2="{MARGIN_TOP + plot_h}" stroke="{GRID_COLOR}"/>'
        )
        content.append(svg_text(x, MARGIN_TOP + plot_h + 16, f"{tick:,}", "middle"))
    line = " ".join(f"{x_of(p[0]):.1f},{y_of(p[1]):.1f}" for p in points)
    content.append(f'<polyline points="{line}" fill="none" stroke="{LINE_COLOR}" stroke-width="2"/>')
    mx, my, text = x_of(marker[0]), y_of(marker[1]), marker[2]
    content.append(
        f'<line x1="{mx:.1f}" x2="{mx:.1f}" y1="{MARGIN_TOP}" y2="{MARGIN_TOP + plot_h}" '
        f'stroke="{MARK_COLOR}" stroke-dasharray="4 3"/>'
    )
    content.append(f'<circle cx="{mx:.1f}" cy="{my:.1f}" r="4" fill="{MARK_COLOR}"/>')
    # At the foot of the marker line, on the side with more room: the curve runs high there.
    anchor = "end" if mx > MARGIN_LEFT + plot_w * 0.6 else "start"
    label_x, label_y = mx + (-8 if anchor == "end" else 8), MARGIN_TOP + plot_h - 10
    content.append(svg_text(label_x, label_y, text, anchor, f' style="fill:{MARK_COLOR}"'))
    content += axis_labels(plot_w, plot_h, x_label, y_label)
    return svg_document(CHART_WIDTH, CHART_HEIGHT, content)


def axis_labels(plot_w: float, plot_h: float, x_label: str, y_label: str) -> list[str]:
    x_axis = svg_text(MARGIN_LEFT + plot_w / 2, CHART_HEIGHT - 6, x_label, "middle")
    y_mid = MARGIN_TOP + plot_h / 2
    y_axis = svg_text(14, y_mid, y_label, "middle", f' transform="rotate(-90 14 {y_mid:.1f})"')
    return [x_axis, y_axis]


def svg_bar_chart(bars: Sequence[tuple[str, float]], value_text: Callable[[float], str]) -> str:
    """Horizontal bars, one labelled row each."""
    row_h, label_w, text_w = 24, 150, 150
    height = row_h * len(bars) + 8
    bar_w = CHART_WIDTH - label_w - text_w
    largest = max((value for _, value in bars), default=0) or 1
    content = []
    for i, (name, value) in enumerate(bars):
        y = 4 + i * row_h
        width = max(bar_w * value / largest, 1)
        content.append(svg_text(label_w - 8, y + 15, name, "end"))
        content.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row_h - 8}" fill="{BAR_COLOR}" rx="2"/>'
        )
        content.append(svg_text(label_w + width + 6, y + 15, value_text(value)))
    return svg_document(CHART_WIDTH, height, content)


def svg_column_chart(values: Sequence[float], *, x_label: str, y_label: str) -> str:
    """One column per value (index on x), with a 0-based y axis."""
    plot_w = CHART_WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = CHART_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    largest = max(values, default=0) or 1
    slot = plot_w / max(len(values), 1)
    content = []
    for fraction in (0, 0.5, 1):
        y = MARGIN_TOP + plot_h * (1 - fraction)
        content.append(
            f'<line x1="{MARGIN_LEFT}" x2="{MARGIN_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID_COLOR}"/>'
        )
        content.append(svg_text(MARGIN_LEFT - 6, y + 4, f"{largest * fraction:,.0f}", "end"))
    for i, value in enumerate(values):
        height = plot_h * value / largest
        x = MARGIN_LEFT + i * slot + slot * 0.1
        content.append(
            f'<rect x="{x:.1f}" y="{MARGIN_TOP + plot_h - height:.1f}" width="{max(slot * 0.8, 0.5):.1f}" '
            f'height="{height:.1f}" fill="{BAR_COLOR}"/>'
        )
    for i in column_ticks(len(values)):
        content.append(svg_text(MARGIN_LEFT + (i + 0.5) * slot, MARGIN_TOP + plot_h + 16, str(i), "middle"))
    content += axis_labels(plot_w, plot_h, x_label, y_label)
    return svg_document(CHART_WIDTH, CHART_HEIGHT, content)


def column_ticks(count: int, most: int = 12) -> range:
    """Column indices to label: all of a few, every k-th of many."""
    return range(0, count, max(1, math.ceil(count / most)))
