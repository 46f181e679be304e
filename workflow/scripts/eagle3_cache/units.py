"""Sizes as people read them, for messages and the report."""

from __future__ import annotations


def format_bytes(size: float) -> str:
    """`1.23 GB` (decimal units, as disks are sold)."""
    units = ("B", "kB", "MB", "GB", "TB", "PB")
    power = 0
    while abs(size) >= 1000 and power < len(units) - 1:
        size /= 1000
        power += 1
    return f"{size:,.0f} B" if power == 0 else f"{size:.3g} {units[power]}"
