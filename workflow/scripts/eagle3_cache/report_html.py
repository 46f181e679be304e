"""The validation report as one self-contained HTML page, and the formatting of its figures.

`render_html` fills `templates/validation_report.html.j2`: inline CSS and inline SVG charts
(`svg`), no script, no stylesheet or image to fetch, so it opens from disk in any browser.

To see a report as a browser draws it, without a display (Debian: `apt-get install -y chromium`):

    chromium --headless --no-sandbox --disable-gpu --disable-background-networking \\
        --disable-component-update --no-first-run --window-size=1200,2400 \\
        --screenshot=report.png file://$PWD/results/demo/validation_report.html

(`REPORT_SCREENSHOT=report.png pytest tests/test_report.py -k chromium` does the same on a test cache.)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from .provenance import producer
from .results import CheckResult, ValidationReport, listed
from .svg import svg_bar_chart, svg_column_chart, svg_line_chart
from .units import format_bytes

TEMPLATES = Path(__file__).parent / "templates"
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


# --- Formatting -----------------------------------------------------------------------------------


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


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_columns(rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """The columns of `rows` that hold only numbers (or nothing)."""
    return {c for c in rows[0] if all(is_number(row.get(c)) or row.get(c) is None for row in rows)}


# --- The page's parts -----------------------------------------------------------------------------


def verdict_headline(report: ValidationReport) -> str:
    if report.passed:
        return f"PASS: all {len(report.checks)} checks passed. This cache is fit to train on."
    failed = report.failed_titles
    return (
        f"FAIL: {len(failed)} of {len(report.checks)} checks failed ({', '.join(failed)}). Do not train on this cache."
    )


def meta_line(report: ValidationReport) -> str:
    return (
        f"cache {report.cache_dir} · validated {report.generated_at} in {format_seconds(report.seconds)} · "
        f"eagle3-cache {producer()['version']}"
    )


def headline_cards(report: ValidationReport) -> list[tuple[str, str]]:
    """(value, label) of each headline number the report has."""
    cards = []
    for key, name, text in HEADLINE:
        check = report.check(key)
        if check is not None and name in check.figures:
            cards.append((format_value(name, check.figures[name]), text))
    return cards


def coverage_chart(check: CheckResult) -> Markup:
    curve = check.series["coverage_curve"]
    size = check.figures["draft_vocab_size"]
    marked = next(point for point in curve if point[0] >= size)
    return svg_line_chart(
        curve,
        x_label="draft vocabulary size (most frequent ids first, log scale)",
        y_label="supervised tokens covered",
        marker=(marked[0], marked[1], f"draft_vocab_size {size:,}: {marked[1]:.1%}"),
    )


def field_bytes_chart(fields: Sequence[Mapping[str, Any]]) -> Markup:
    bars = [(row["field"], float(row["per_sample_bytes"])) for row in fields]
    return svg_bar_chart(bars, lambda value: f"{format_bytes(value)} / sample")


def throughput_chart(shards: Sequence[Mapping[str, Any]]) -> Markup:
    return svg_column_chart([float(r["tokens_per_second"]) for r in shards], x_label="shard", y_label="real tokens / s")


@functools.cache
def report_template() -> jinja2.Template:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(label=label, listed=listed)
    environment.globals.update(
        format_value=format_value,
        numeric_columns=numeric_columns,
        verdict_headline=verdict_headline,
        meta_line=meta_line,
        headline_cards=headline_cards,
        coverage_chart=coverage_chart,
        field_bytes_chart=field_bytes_chart,
        throughput_chart=throughput_chart,
    )
    return environment.get_template("validation_report.html.j2")


def render_html(report: ValidationReport) -> str:
    """The whole report as one self-contained HTML document."""
    return report_template().render(report=report)
