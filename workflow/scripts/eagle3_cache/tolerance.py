"""How far a recomputed float field may be from the stored one, given the dtypes both passed through.

With every computation in fp32, values must agree within a few units of the coarsest rounding
they passed through (the cache dtype's, usually): the sums of a batch of another shape reorder
only fp32 roundings. With bf16/fp16 compute, as on every CUDA run, that is far too tight: bf16's
own rounding, carried through every layer, moves a value by many of its units, and by how much
depends on the batch's shape. Measured on SmolLM2-135M (30 layers) over 6,281 positions, bf16
against fp32 compute: hidden states 0.5–1.3% apart by relative L2 distance at the median and
up to 14%; distributions 1.5% apart by total variation at the median and up to 15%. So under
reduced precision the rule is per position: a distance of at most REDUCED_PRECISION_UNITS units
of rounding (0.125 for bf16), with a few outlier positions allowed per sample. A row shifted by
one position, another sample's row or another aux layer's hidden state is 30–100% away at nearly
every position, so it still fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .preflight import AUX_LAYER_COUNT

# Stored and recomputed values may differ by this many units of the coarser dtype's rounding.
TOLERANCE_ULPS = 4
TOLERANCE_RULE = f"|Δ| ≤ {TOLERANCE_ULPS}·eps·(|value| + largest |value| at its position)"
# Under bf16/fp16 compute, a position's distance may reach this many units of rounding...
REDUCED_PRECISION_UNITS = 16
# ...and a sample may have this share of its positions beyond (at least one), if finite: bf16
# against fp32 compute had at most 0.8% in a sample, a shifted row has all of them.
MAX_OUTLIER_SHARE = 0.02
REDUCED_PRECISION_RULE = (
    f"per position: total variation between distributions, and relative L2 distance of each layer's "
    f"hidden state, ≤ {REDUCED_PRECISION_UNITS}·eps; beyond at no more than {MAX_OUTLIER_SHARE:.0%} of a "
    "sample's positions (at least one)"
)
# Fields whose rows are distributions, and whose rows are logits (compared as their softmax).
DISTRIBUTION_FIELDS = ("target_probs",)
LOGIT_FIELDS = ("logits",)
# Fields whose rows are the aux layers' hidden states side by side, each layer compared on its own.
AUX_HIDDEN_FIELDS = ("aux_hidden_states", "aux_hidden_state")


@dataclass(frozen=True)
class Tolerance:
    """What the rule allows a float field: the coarsest rounding unit, and whether a side computed coarser than fp32."""

    eps: float
    reduced_precision: bool

    @property
    def rule(self) -> str:
        return REDUCED_PRECISION_RULE if self.reduced_precision else TOLERANCE_RULE

    @property
    def max_distance(self) -> float:
        """The largest per-position distance within tolerance under reduced precision."""
        return REDUCED_PRECISION_UNITS * self.eps

    def outliers_allowed(self, positions: int) -> int:
        """Positions of one sample that may lie beyond `max_distance`; none with fp32 compute."""
        return max(1, math.floor(MAX_OUTLIER_SHARE * positions)) if self.reduced_precision else 0


def parity_tolerance(cache_dtype: torch.dtype, compute_dtypes: set[torch.dtype]) -> Tolerance:
    """The tolerance for values stored in `cache_dtype` and computed (on either side) in `compute_dtypes`."""
    eps = max(torch.finfo(dtype).eps for dtype in {cache_dtype, *compute_dtypes})
    return Tolerance(eps, reduced_precision=not compute_dtypes <= {torch.float32})


def position_distances(name: str, live: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Per position, how far apart two `[P, D]` rows of field `name` are, as a share (NaN counts as infinite).

    Total variation for distributions (of the softmax, for logits); for hidden states, the largest
    relative L2 distance of one layer's part, so that one wrong layer is not hidden by the others.
    """
    if name in DISTRIBUTION_FIELDS + LOGIT_FIELDS:
        if name in LOGIT_FIELDS:
            live, stored = torch.softmax(live, dim=-1), torch.softmax(stored, dim=-1)
        distances = 0.5 * (live - stored).abs().sum(dim=-1)
    else:
        layers = AUX_LAYER_COUNT if name in AUX_HIDDEN_FIELDS else 1
        live, stored = live.unflatten(-1, (layers, -1)), stored.unflatten(-1, (layers, -1))
        norms = stored.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        distances = ((live - stored).norm(dim=-1) / norms).amax(dim=-1)
    return distances.nan_to_num(nan=math.inf)


@dataclass
class FieldErrors:
    """How far a recomputed float field of one sample is from the stored one, by both measures of the rule."""

    name: str
    compared: int = 0
    beyond_tolerance: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst_position: int = -1
    positions: int = 0
    positions_beyond: int = 0
    max_distance: float = 0.0
    farthest_position: int = -1

    def add_block(
        self, live: torch.Tensor, stored: torch.Tensor, positions: torch.Tensor, tolerance: Tolerance
    ) -> None:
        """Compare `[P, D]` rows taken at `positions`.

        A value is within the fp32 rule when |live - stored| <= ULPS·eps·(|stored| + m), m being the
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
        beyond = ~(diff <= TOLERANCE_ULPS * tolerance.eps * (stored.abs() + scale))
        per_position = (diff / scale.clamp_min(torch.finfo(torch.float32).tiny)).amax(dim=-1).nan_to_num(nan=math.inf)
        worst = int(per_position.argmax())
        if self.worst_position < 0 or float(per_position[worst]) > self.max_rel:
            self.max_rel, self.worst_position = float(per_position[worst]), int(positions[worst])
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.compared += diff.numel()
        self.beyond_tolerance += int(beyond.sum())
        distances = position_distances(self.name, live, stored)
        farthest = int(distances.argmax())
        if self.farthest_position < 0 or float(distances[farthest]) > self.max_distance:
            self.max_distance, self.farthest_position = float(distances[farthest]), int(positions[farthest])
        self.positions += len(distances)
        self.positions_beyond += int((~(distances <= tolerance.max_distance)).sum())

    def within(self, tolerance: Tolerance) -> bool:
        """Whether the sample's field keeps the rule."""
        if tolerance.reduced_precision:
            # An outlier is noise only while it is a number: a NaN or Inf anywhere fails.
            allowed = tolerance.outliers_allowed(self.positions)
            return math.isfinite(self.max_distance) and self.positions_beyond <= allowed
        return not self.beyond_tolerance

    def problem(self, where: str, tolerance: Tolerance) -> str:
        """What breaks the rule, in one line."""
        if tolerance.reduced_precision:
            return (
                f"{where}: {self.name}: {self.positions_beyond} of {self.positions} positions beyond tolerance "
                f"(at most {tolerance.outliers_allowed(self.positions)} allowed); farthest at position "
                f"{self.farthest_position}: {self.max_distance:.3g} apart (at most {tolerance.max_distance:.3g} "
                "tolerated)"
            )
        return (
            f"{where}: {self.name}: {self.beyond_tolerance} of {self.compared} values beyond tolerance; "
            f"largest error {self.max_abs:.3g}, worst at position {self.worst_position}: "
            f"{self.max_rel:.3g} of its largest |value| (at most {2 * TOLERANCE_ULPS * tolerance.eps:.3g} tolerated)"
        )


def tolerance_problems(where: str, errors: Mapping[str, FieldErrors], tolerance: Tolerance) -> list[str]:
    """One line per float field of one sample that breaks the rule."""
    return [e.problem(where, tolerance) for e in errors.values() if not e.within(tolerance)]


def tolerance_row(name: str, errors: Sequence[FieldErrors], tolerance: Tolerance) -> dict[str, Any]:
    """A float field's row of the parity table: its errors over every sample compared."""
    return {
        "field": name,
        "rule": "per-position distance" if tolerance.reduced_precision else "within tolerance",
        "compared": sum(e.positions if tolerance.reduced_precision else e.compared for e in errors),
        "differing": sum(e.positions_beyond if tolerance.reduced_precision else e.beyond_tolerance for e in errors),
        "max_abs_error": max((e.max_abs for e in errors), default=0.0),
        "max_rel_error": max((e.max_rel for e in errors), default=0.0),
        "max_distance": max((e.max_distance for e in errors), default=0.0),
    }
