"""The results of validation: a `CheckResult` per check, a `ValidationReport` of them all, and their shared wording."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .provenance import producer

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
# Sample indices listed in the report and the JSON (counts are always complete).
MAX_LISTED = 200


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
        return {**asdict(self), "title": self.title, "seconds": round(self.seconds, 3)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckResult:
        """The result a job wrote (the live parity job's `parity.json`)."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


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


def problems_summary(problems: Sequence[str]) -> str:
    """The summary line of a failed check: its problem, or how many and the first."""
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems; first: {problems[0]}"


def listed(indices: Sequence[int]) -> str:
    """Sample indices for a message, cut after MAX_LISTED."""
    shown = ", ".join(str(i) for i in indices[:MAX_LISTED])
    return shown + (f" and {len(indices) - MAX_LISTED} more" if len(indices) > MAX_LISTED else "")
