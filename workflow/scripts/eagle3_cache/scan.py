"""The scan of a whole cache (every sample of every shard, read once), and the two checks built on it.

Shards are streamed a few rows at a time, so RAM stays bounded whatever the cache's size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache_rows import shifted_left
from .results import MAX_LISTED, CheckResult, listed, problems_summary
from .shard_format import DTYPES, ShardLayout, read_shard_block
from .token_store import TokenBlock, TokenizedInfo, read_token_block

# Below half, the draft is asked mostly for tokens it cannot produce: a misconfigured vocabulary.
MIN_DRAFT_SHARE = 0.5
# How much of a shard the scan holds in memory at once.
READ_BUDGET_BYTES = 256 << 20


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


# --- 3. Numerically sane ------------------------------------------------------------------------


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
        f"{scan.samples_scanned} samples: no NaN/Inf, "
        f"distributions sum to 1 (worst {scan.max_probability_sum_error:.2g}), "
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
