"""The report's charts as inline SVG: a line over a log axis, horizontal bars, and columns."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

CHART_WIDTH, CHART_HEIGHT = 760, 300
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 24, 16, 44
LINE_COLOR, MARK_COLOR, BAR_COLOR, GRID_COLOR = "#2457a6", "#b42318", "#4f7cc4", "#e3e7ec"


def svg_document(width: int, height: int, content: Sequence[str]) -> Markup:
    opening = f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
    return Markup(opening + "".join(content) + "</svg>")


def svg_text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{escape(text)}</text>'


def log_ticks(largest: float) -> list[int]:
    """1, 10, 100, ... up to `largest`."""
    return [10**power for power in range(int(math.log10(max(largest, 1))) + 1)]


def svg_line_chart(
    points: Sequence[Sequence[float]], *, x_label: str, y_label: str, marker: tuple[float, float, str]
) -> Markup:
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


def svg_bar_chart(bars: Sequence[tuple[str, float]], value_text: Callable[[float], str]) -> Markup:
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


def svg_column_chart(values: Sequence[float], *, x_label: str, y_label: str) -> Markup:
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
