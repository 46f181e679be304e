"""The cost check: per shard job, its time and throughput from its stats, and Snakemake's benchmark of it."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .layout import shard_index
from .report_html import format_seconds
from .results import CheckResult, listed


def read_benchmark(path: Path) -> dict[str, float | None]:
    """The first row of a Snakemake benchmark file (`s`, `max_rss` in MB, ...); "NA" becomes None."""
    with open(path, newline="") as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    return {key: None if value in ("NA", "-", "") else float(value) for key, value in row.items() if key != "h:m:s"}


def shard_cost_row(stats: Mapping[str, Any], benchmark: Mapping[str, float | None] | None) -> dict[str, Any]:
    """One shard job's time and throughput."""
    seconds = stats["seconds"]
    start, load = float(seconds.get("start", 0.0)), float(seconds.get("load", 0.0))
    total = start + float(seconds.get("total", 0.0))
    return {
        "shard": stats["shard"],
        "samples": stats["num_samples"],
        "job_seconds": total,
        "start_seconds": start,
        "load_seconds": load,
        "forward_seconds": float(seconds.get("forward", 0.0)),
        "write_seconds": float(seconds.get("write", 0.0)),
        "real_tokens": stats["real_tokens"],
        "tokens_per_second": stats["real_tokens"] / total if total else 0.0,
        "load_share": load / total if total else 0.0,
        "fixed_share": (start + load) / total if total else 0.0,
        # The part of the padded [samples, seq_length] grid the target ran on; trimming skipped the rest.
        "positions_computed_share": (
            stats["computed_tokens"] / stats["padded_tokens"] if stats["padded_tokens"] else 0.0
        ),
        "benchmark_seconds": benchmark.get("s") if benchmark else None,
        "max_rss_mb": benchmark.get("max_rss") if benchmark else None,
        "device": stats.get("device"),
        "compute_dtype": stats.get("compute_dtype"),
    }


def cost_check(
    stats: Sequence[Mapping[str, Any]],
    benchmarks: Sequence[Path],
    shard_count: int,
    verified: Sequence[Mapping[str, Any]],
    parity: CheckResult,
) -> CheckResult:
    """Per shard job: wall time, its fixed cost (start and imports, model load), tokens per second, and
    Snakemake's benchmark when present; and what validating took: the verification jobs' seconds and the
    GPU seconds of live parity, its only GPU step."""
    by_shard = {shard_index(path): read_benchmark(path) for path in benchmarks if path.exists()}
    rows = [shard_cost_row(s, by_shard.get(s["shard"])) for s in sorted(stats, key=lambda s: s["shard"])]
    job_seconds = sum(r["job_seconds"] for r in rows)
    start_seconds = sum(r["start_seconds"] for r in rows)
    load_seconds = sum(r["load_seconds"] for r in rows)
    real_tokens = sum(r["real_tokens"] for r in rows)
    computed, padded = sum(s["computed_tokens"] for s in stats), sum(s["padded_tokens"] for s in stats)
    figures = {
        "shard_jobs": len(rows),
        "job_seconds": job_seconds,
        "start_seconds": start_seconds,
        "load_seconds": load_seconds,
        "load_share": load_seconds / job_seconds if job_seconds else 0.0,
        # What every shard job pays before its work, against all of their time: shards too small for
        # their target show here (see README, Performance: sizing shards).
        "fixed_share": (start_seconds + load_seconds) / job_seconds if job_seconds else 0.0,
        "tokens_per_second": real_tokens / job_seconds if job_seconds else 0.0,
        "positions_computed_share": computed / padded if padded else 0.0,
        "max_rss_mb": max((r["max_rss_mb"] for r in rows if r["max_rss_mb"] is not None), default=None),
        "verification_seconds": sum(record["seconds"] for record in verified),
        "parity_gpu_seconds": parity.figures.get("gpu_seconds", 0.0),
    }
    missing = sorted(set(range(shard_count)) - {r["shard"] for r in rows})
    if missing:
        summary = f"no stats for {len(missing)} shard(s): {listed(missing)}"
        return CheckResult("cost", False, summary, figures, {"shards": rows}, [summary])
    summary = (
        f"{len(rows)} shard jobs, {format_seconds(job_seconds)} in all, "
        f"{figures['tokens_per_second']:,.0f} real tokens/s; "
        f"fixed cost (start and imports, model load) is {figures['fixed_share']:.0%} of shard-job time "
        f"(the load alone {figures['load_share']:.0%}); validation: "
        f"{format_seconds(figures['verification_seconds'])} of CPU verification jobs, "
        f"{figures['parity_gpu_seconds']:.0f} GPU·s of live parity"
    )
    return CheckResult("cost", True, summary, figures, {"shards": rows})
