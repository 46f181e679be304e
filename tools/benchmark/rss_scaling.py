"""The --rss-scaling mode: peak RSS of one shard job at shard size S and 2S."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from .workload import prepared_jobs, run_child, workload_from

RSS_GROWTH_TARGET = 0.10  # peak RSS increase when the shard size doubles


def rss_scaling(args: argparse.Namespace, work: Path) -> dict:
    """Peak RSS of one shard job at shard size S and 2S, each in a fresh process."""
    sizes = (args.shard_size, 2 * args.shard_size)
    workload = workload_from(argparse.Namespace(**{**vars(args), "num_samples": max(args.num_samples, sizes[1])}), work)
    job, _ = prepared_jobs(workload, work)
    runs = {}
    for size in sizes:
        output = work / f"shards-{size}"
        print(f"shard size {size} ...", flush=True)
        sized = replace(workload, shard_size=size)
        runs[size] = run_child("ours", {**job, "workload": asdict(sized), "output": str(output), "shards": [0]}, work)
        shutil.rmtree(output)
    small, large = (runs[size] for size in sizes)
    print()
    print(f"{'shard size':>10}{'samples':>9}{'peak RSS (MiB)':>16}{'after load (MiB)':>18}{'growth (MiB)':>14}")
    for size, run in runs.items():
        growth = run["peak_rss_mib"] - run["loaded_rss_mib"]
        print(f"{size:>10}{run['samples']:>9}{run['peak_rss_mib']:>16.0f}{run['loaded_rss_mib']:>18.0f}{growth:>14.0f}")
    ratio = large["peak_rss_mib"] / small["peak_rss_mib"]
    verdict = "PASS" if ratio < 1 + RSS_GROWTH_TARGET else "FAIL"
    print(f"peak RSS ratio {sizes[1]} / {sizes[0]}: {ratio:.3f} ({verdict}: target < {1 + RSS_GROWTH_TARGET:.2f})")
    return {"workload": asdict(workload), "runs": {str(k): v for k, v in runs.items()}, "peak_rss_ratio": ratio}
