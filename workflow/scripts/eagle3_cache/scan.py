"""The numeric scan of a shard's rows.

One scan, fed a field at a time, runs where the rows already are: in the shard job on each batch
before it is written (`ShardScan.add_batch`), and in the shard's verification job on the
committed file as it is read back (`ShardScan.add`). It looks for NaN/Inf, distributions that do
not sum to 1 (top-k included), nonzero padding, position_mask outside the loss and ids or masks
that are not the tokenized rows, and counts the supervision. Its `ScanSummary` names the field and
the first sample of each problem (`scan_summary`, where the report adds them up).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import array_ops as ops
from .scan_summary import ScanSummary
from .shard_layout import CACHE_DTYPE_EPS

if TYPE_CHECKING:
    from .cache_rows import CacheBatch
    from .token_store import TokenBlock

DISTRIBUTION_FIELDS = ("target_probs", "target_probs_values")


def probability_sum_tolerance(cache_dtype: str) -> float:
    """How far from 1 a stored distribution (of the run's `dtype`) may sum.

    Rounding each probability to the cache dtype moves the sum by at most eps/2 (the values are
    positive and sum to 1); the fp32 softmax and the fp32 re-summation here add ~1e-6 even over a
    256k vocabulary.
    """
    return CACHE_DTYPE_EPS[cache_dtype] + 1e-5


class ShardScan:
    """The scan of one shard's samples, fed field by field in any row order.

    `tokens` are the shard's tokenized rows; ids and masks are compared with them (shifted as a
    shard stores them), and their attention and loss masks say which positions are content,
    padding and supervised. Torch tensors (a shard job's) or numpy arrays (a verification's): the
    values fed must be of the same library (`array_ops`).
    """

    def __init__(self, first_sample: int, tokens: TokenBlock, draft_vocab_size: int, cache_dtype: str):
        self.first_sample = first_sample
        self.expected = {
            "input_ids": ops.shifted_left(tokens.input_ids),
            "attention_mask": tokens.attention_mask,
            "loss_mask": ops.shifted_left(tokens.loss_mask),
        }
        self.content = ops.as_bool(tokens.attention_mask)
        self.supervised = ops.as_bool(self.expected["loss_mask"])
        self.draft_vocab_size = draft_vocab_size
        self.summary = ScanSummary(probability_sum_tolerance=probability_sum_tolerance(cache_dtype))

    def add_batch(self, batch: CacheBatch, rows: Sequence[int]) -> None:
        """A computed batch as the shard job writes it: full-width ids and masks, each computed row's content prefix."""
        index = ops.index_like(rows, self.content)
        for name, values in batch.full_width_fields.items():
            self.add(name, index, values)
        for name, values in batch.computed.items():
            lengths = ops.on_device_of(batch.lengths, values)
            positions = ops.on_device_of(ops.index_like(range(values.shape[1]), self.content), values)
            self.add(name, index, values, positions < lengths[:, None])

    def add(self, name: str, rows: ops.Array, values: ops.Array, written: ops.Array | None = None) -> None:
        """Fold in field `name` of the shard's `rows`: `[len(rows), W, ...]` values for the first W positions.

        `written` (`[len(rows), W]`) marks the positions that reach the file; None means all of them.
        Positions past W, and unwritten ones, are zeros in the file.
        """
        if ops.is_numpy(values) != ops.is_numpy(self.content):
            raise TypeError(f"{name}: the scan's tokens and values must be arrays of one library (array_ops)")
        if name in self.expected:
            self.add_tokens(name, rows, values)
            return
        width = values.shape[1]
        content = ops.on_device_of(self.content[rows, :width], values)
        if written is None:
            written = ops.ones_like(content)
        self.add_extremes(name, rows, values, content, written)
        if name in DISTRIBUTION_FIELDS:
            self.add_sums(name, rows, values, content & written)
        elif name == "target_probs_indices":
            self.add_indices(name, rows, values, content & written)
        elif name == "position_mask":
            marked = ops.as_bool(values.squeeze(-1)) & written
            supervised = ops.on_device_of(self.supervised[rows, :width], values)
            self.record("outside_loss", name, marked & ~supervised, rows)
            self.summary.in_draft_positions += int(marked.sum())

    def add_tokens(self, name: str, rows: ops.Array, values: ops.Array) -> None:
        """Ids and masks must be the tokenized rows; they also give the sample and supervision counts."""
        unlike = rows[ops.any_last(ops.to_host(values) != self.expected[name][rows])]
        if len(unlike):
            samples = {self.first_sample + int(row) for row in unlike}
            self.summary.record("unlike_tokenized", name, len(samples), min(samples))
            self.summary.samples_unlike_tokenized = sorted({*self.summary.samples_unlike_tokenized, *samples})
        if name == "input_ids":
            self.summary.samples += values.shape[0]
            self.summary.total_positions += values.shape[0] * values.shape[1]
        elif name == "loss_mask":
            self.summary.supervised_positions += int(ops.as_bool(values).sum())

    def add_extremes(
        self, name: str, rows: ops.Array, values: ops.Array, content: ops.Array, written: ops.Array
    ) -> None:
        """NaN/Inf where written, and padding positions that are not all zeros.

        Both come from each position's largest and smallest value (NaN propagates through them), two
        reductions that cost a fraction of an elementwise `isfinite`; values are counted one by one
        only at the positions found bad.
        """
        comparable = ops.as_uint8(values) if ops.is_bool(values) else values
        high, low = ops.max_last(comparable), ops.min_last(comparable)
        self.record("padding", name, written & ~content & ((high != 0) | (low != 0)), rows)
        if ops.is_floating(values):
            bad = written & ~(ops.isfinite(high) & ops.isfinite(low))
            if bad.any():
                count = int((~ops.isfinite(values[bad])).sum())
                self.summary.record("nonfinite", name, count, self.first_row(bad, rows))

    def add_sums(self, name: str, rows: ops.Array, values: ops.Array, content: ops.Array) -> None:
        """Each content position's distribution must sum to 1 (top-k values: once renormalized, they do too)."""
        error = abs(ops.float32_sum_last(values) - 1)
        if content.any():
            worst = ops.worst(error[content])
            self.summary.max_probability_sum_error = max(self.summary.max_probability_sum_error, worst)
        self.record("sum", name, content & ~(error <= self.summary.probability_sum_tolerance), rows)

    def add_indices(self, name: str, rows: ops.Array, values: ops.Array, content: ops.Array) -> None:
        """Top-k indices must be distinct and inside the draft vocabulary.

        Then summing the top-k values equals summing their reconstruction, so the sums need no
        `[n, S, draft vocab]` tensor.
        """
        indices = ops.sort_last(values)
        valid = (indices[..., 0] >= 0) & (indices[..., -1] < self.draft_vocab_size)
        valid &= ops.all_last(ops.diff_last(indices) > 0)
        self.record("topk_indices", name, content & ~valid, rows)

    def record(self, kind: str, name: str, positions: ops.Array, rows: ops.Array) -> None:
        """Count a problem at `positions` (`[len(rows), W]` bool), if any."""
        count = int(positions.sum())
        if count:
            self.summary.record(kind, name, count, self.first_row(positions, rows))

    def first_row(self, positions: ops.Array, rows: ops.Array) -> int:
        """The first sample with a position set in `positions`."""
        hit = ops.to_host(ops.any_last(positions.reshape(positions.shape[0], -1)))
        return self.first_sample + int(rows[hit].min())
