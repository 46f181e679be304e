"""What a numeric scan found (`ScanSummary`), as the shard and verification jobs record it, and the two report
checks built on the summaries. No torch: the report job adds up the shards' summaries without it.

The scan itself, which reads the rows, is `scan.ShardScan`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .results import MAX_LISTED, CheckResult, listed, problems_summary
from .token_store import TokenizedInfo

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
