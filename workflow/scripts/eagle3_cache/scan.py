"""The numeric scan of a shard's rows, and the two report checks built on it.

One scan, fed a field at a time, runs where the rows already are: in the shard job on each batch
before it is written (`ShardScan.add_batch`), and in the shard's verification job on the
committed file as it is read back (`ShardScan.add`). It looks for NaN/Inf, distributions that do
not sum to 1 (top-k included), nonzero padding, position_mask outside the loss and ids or masks
that are not the tokenized rows, and counts the supervision. Its `ScanSummary` names the field and
the first sample of each problem; the report adds up the shards' summaries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .cache_rows import CacheBatch, shifted_left
from .results import MAX_LISTED, CheckResult, listed, problems_summary
from .token_store import TokenBlock, TokenizedInfo

# Below half, the draft is asked mostly for tokens it cannot produce: a misconfigured vocabulary.
MIN_DRAFT_SHARE = 0.5
# What each kind of finding means, for its message.
FINDING_TEXT = {
    "nonfinite": "NaN or Inf values",
    "sum": "positions whose distribution does not sum to 1",
    "topk_indices": "positions with repeated or out-of-range indices",
    "outside_loss": "positions set outside the shifted loss_mask",
    "padding": "padding positions (attention_mask 0) holding nonzero values",
    "unlike_tokenized": "samples whose rows are not the tokenized rows (as the format stores them)",
}
DISTRIBUTION_FIELDS = ("target_probs", "target_probs_values")


def probability_sum_tolerance(cache_dtype: torch.dtype) -> float:
    """How far from 1 a stored distribution may sum.

    Rounding each probability to the cache dtype moves the sum by at most eps/2 (the values are
    positive and sum to 1); the fp32 softmax and the fp32 re-summation here add ~1e-6 even over a
    256k vocabulary.
    """
    return torch.finfo(cache_dtype).eps + 1e-5


@dataclass
class Finding:
    """One kind of problem in one field: how many positions (samples, for ids and masks), and the first sample."""

    kind: str
    field: str
    count: int
    first_sample: int

    def __str__(self) -> str:
        return f"{self.field}: {self.count} {FINDING_TEXT[self.kind]}, first in sample {self.first_sample}"


@dataclass
class ScanSummary:
    """What the scan found in some samples (a shard, or the whole cache once summaries are merged)."""

    samples: int = 0
    total_positions: int = 0
    supervised_positions: int = 0
    in_draft_positions: int = 0
    max_probability_sum_error: float = 0.0
    probability_sum_tolerance: float = 0.0
    findings: list[Finding] = field(default_factory=list)
    samples_unlike_tokenized: list[int] = field(default_factory=list)

    def problems(self) -> list[str]:
        """One line per problem, naming the field and the first sample it hit."""
        lines = [str(finding) for finding in self.findings]
        if any(f.kind == "sum" for f in self.findings):
            lines.append(
                f"the worst distribution sums to 1 ± {self.max_probability_sum_error:.3g}, "
                f"where ± {self.probability_sum_tolerance:.2g} is tolerated"
            )
        return lines

    def count(self, kind: str) -> int:
        return sum(f.count for f in self.findings if f.kind == kind)

    def record(self, kind: str, name: str, count: int, first_sample: int) -> None:
        """Add `count` occurrences of a problem, first seen in `first_sample`."""
        for finding in self.findings:
            if (finding.kind, finding.field) == (kind, name):
                finding.count += count
                finding.first_sample = min(finding.first_sample, first_sample)
                return
        self.findings.append(Finding(kind, name, count, first_sample))

    def merge(self, other: ScanSummary) -> None:
        """Fold another summary (another shard's) into this one."""
        self.samples += other.samples
        self.total_positions += other.total_positions
        self.supervised_positions += other.supervised_positions
        self.in_draft_positions += other.in_draft_positions
        self.max_probability_sum_error = max(self.max_probability_sum_error, other.max_probability_sum_error)
        self.probability_sum_tolerance = max(self.probability_sum_tolerance, other.probability_sum_tolerance)
        for finding in other.findings:
            self.record(finding.kind, finding.field, finding.count, finding.first_sample)
        self.samples_unlike_tokenized = sorted({*self.samples_unlike_tokenized, *other.samples_unlike_tokenized})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScanSummary:
        return cls(**{**data, "findings": [Finding(**f) for f in data["findings"]]})


def merged_scans(summaries: Sequence[Mapping[str, Any]]) -> ScanSummary:
    """The shards' scan summaries (as JSON) added up into one for the whole cache."""
    total = ScanSummary()
    for summary in summaries:
        total.merge(ScanSummary.from_json(summary))
    return total


class ShardScan:
    """The scan of one shard's samples, fed field by field in any row order.

    `tokens` are the shard's tokenized rows; ids and masks are compared with them (shifted as a
    shard stores them), and their attention and loss masks say which positions are content,
    padding and supervised.
    """

    def __init__(self, first_sample: int, tokens: TokenBlock, draft_vocab_size: int, cache_dtype: torch.dtype):
        self.first_sample = first_sample
        self.expected = {
            "input_ids": shifted_left(tokens.input_ids),
            "attention_mask": tokens.attention_mask,
            "loss_mask": shifted_left(tokens.loss_mask),
        }
        self.content = tokens.attention_mask.bool()
        self.supervised = self.expected["loss_mask"].bool()
        self.draft_vocab_size = draft_vocab_size
        self.summary = ScanSummary(probability_sum_tolerance=probability_sum_tolerance(cache_dtype))

    def add_batch(self, batch: CacheBatch, rows: Sequence[int]) -> None:
        """A computed batch as the shard job writes it: full-width ids and masks, each computed row's content prefix."""
        index = torch.tensor(rows)
        for name, values in batch.full_width_fields.items():
            self.add(name, index, values)
        for name, values in batch.computed.items():
            lengths = batch.lengths.to(values.device)
            written = torch.arange(values.shape[1], device=values.device) < lengths[:, None]
            self.add(name, index, values, written)

    def add(self, name: str, rows: torch.Tensor, values: torch.Tensor, written: torch.Tensor | None = None) -> None:
        """Fold in field `name` of the shard's `rows`: `[len(rows), W, ...]` values for the first W positions.

        `written` (`[len(rows), W]`) marks the positions that reach the file; None means all of them.
        Positions past W, and unwritten ones, are zeros in the file.
        """
        if name in self.expected:
            self.add_tokens(name, rows, values)
            return
        width, device = values.shape[1], values.device
        content = self.content[rows, :width].to(device)
        if written is None:
            written = torch.ones_like(content)
        self.add_extremes(name, rows, values, content, written)
        if name in DISTRIBUTION_FIELDS:
            self.add_sums(name, rows, values, content & written)
        elif name == "target_probs_indices":
            self.add_indices(name, rows, values, content & written)
        elif name == "position_mask":
            marked = values.squeeze(-1).bool() & written
            self.record("outside_loss", name, marked & ~self.supervised[rows, :width].to(device), rows)
            self.summary.in_draft_positions += int(marked.sum())

    def add_tokens(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Ids and masks must be the tokenized rows; they also give the sample and supervision counts."""
        unlike = rows[(values.cpu() != self.expected[name][rows]).any(dim=-1)]
        if len(unlike):
            samples = {self.first_sample + int(row) for row in unlike}
            self.summary.record("unlike_tokenized", name, len(samples), min(samples))
            self.summary.samples_unlike_tokenized = sorted({*self.summary.samples_unlike_tokenized, *samples})
        if name == "input_ids":
            self.summary.samples += values.shape[0]
            self.summary.total_positions += values.numel()
        elif name == "loss_mask":
            self.summary.supervised_positions += int(values.bool().sum())

    def add_extremes(
        self, name: str, rows: torch.Tensor, values: torch.Tensor, content: torch.Tensor, written: torch.Tensor
    ) -> None:
        """NaN/Inf where written, and padding positions that are not all zeros.

        Both come from each position's largest and smallest value (NaN propagates through them), two
        reductions that cost a fraction of an elementwise `isfinite`; values are counted one by one
        only at the positions found bad.
        """
        comparable = values.to(torch.uint8) if values.dtype == torch.bool else values
        high, low = comparable.amax(dim=-1), comparable.amin(dim=-1)
        self.record("padding", name, written & ~content & ((high != 0) | (low != 0)), rows)
        if values.is_floating_point():
            bad = written & ~(torch.isfinite(high) & torch.isfinite(low))
            if bad.any():
                count = int((~torch.isfinite(values[bad])).sum())
                self.summary.record("nonfinite", name, count, self.first_row(bad, rows))

    def add_sums(self, name: str, rows: torch.Tensor, values: torch.Tensor, content: torch.Tensor) -> None:
        """Each content position's distribution must sum to 1 (top-k values: once renormalized, they do too)."""
        error = (values.sum(dim=-1, dtype=torch.float32) - 1).abs()
        if content.any():
            worst = float(error[content].nan_to_num(math.inf).max())
            self.summary.max_probability_sum_error = max(self.summary.max_probability_sum_error, worst)
        self.record("sum", name, content & ~(error <= self.summary.probability_sum_tolerance), rows)

    def add_indices(self, name: str, rows: torch.Tensor, values: torch.Tensor, content: torch.Tensor) -> None:
        """Top-k indices must be distinct and inside the draft vocabulary.

        Then summing the top-k values equals summing their reconstruction, so the sums need no
        `[n, S, draft vocab]` tensor.
        """
        indices = values.sort(dim=-1).values
        valid = (indices[..., 0] >= 0) & (indices[..., -1] < self.draft_vocab_size)
        valid &= (indices.diff(dim=-1) > 0).all(dim=-1)
        self.record("topk_indices", name, content & ~valid, rows)

    def record(self, kind: str, name: str, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Count a problem at `positions` (`[len(rows), W]` bool), if any."""
        count = int(positions.sum())
        if count:
            self.summary.record(kind, name, count, self.first_row(positions, rows))

    def first_row(self, positions: torch.Tensor, rows: torch.Tensor) -> int:
        """The first sample with a position set in `positions`."""
        hit = positions.reshape(positions.shape[0], -1).any(dim=-1).cpu()
        return self.first_sample + int(rows[hit].min())


# --- 3. Numerically sane ------------------------------------------------------------------------


def sanity_check(scan: ScanSummary, num_samples: int) -> CheckResult:
    """No NaN or Inf, distributions that sum to 1, position_mask inside the loss mask, zeros in the padding."""
    problems = scan.problems()
    if scan.samples_unlike_tokenized:
        unlike = listed(scan.samples_unlike_tokenized)
        problems.append(f"samples whose ids or masks are not the tokenized rows: {unlike}")
    if scan.samples != num_samples:
        problems.append(f"the verified shards hold {scan.samples} samples, the manifest has {num_samples}")
    figures = {
        "samples_scanned": scan.samples,
        "nonfinite_values": scan.count("nonfinite"),
        "max_probability_sum_error": scan.max_probability_sum_error,
        "probability_sum_tolerance": scan.probability_sum_tolerance,
        "position_mask_outside_loss": scan.count("outside_loss"),
        "padding_positions_not_zero": scan.count("padding"),
        "samples_unlike_tokenized": len(scan.samples_unlike_tokenized),
    }
    if problems:
        return CheckResult("sanity", False, problems_summary(problems), figures, details=problems)
    summary = (
        f"{scan.samples} samples: no NaN/Inf, "
        f"distributions sum to 1 (worst {scan.max_probability_sum_error:.2g}), "
        "position_mask inside the loss mask, padding zero, ids and masks equal the tokenized rows"
    )
    return CheckResult("sanity", True, summary, figures)


# --- 4. Supervision ----------------------------------------------------------------------------


def supervision_check(scan: ScanSummary, info: TokenizedInfo) -> CheckResult:
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
