"""Snakemake's scheduling cost per job as the number of shards grows, for each scheduler setting.

Generates a workflow of the cache's shape (per shard: a job holding a `gpu` resource, then a CPU
verification job; then one commit job over all shards), whose jobs only touch their outputs, and runs it
at each shard count under each scheduler setting: a dry run first (the DAG alone), then the run. The
scheduling cost per job is the run's wall time less the dry run's, over the jobs run: what the head
process spends choosing and starting jobs, which the shard jobs' own work does not hide.

    python -m tools.scheduler_scaling --shards 300 3000 6000 --settings greedy-subsample default
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SNAKEFILE = """
SHARDS = [f"{index:06d}" for index in range(config["shards"])]


rule all:
    input:
        "manifest.json",
    localrule: True


rule compute:
    output:
        "shards/shard-{shard}.safetensors",
    resources:
        gpu=1,
    shell:
        "touch {output}"


rule verify:
    input:
        "shards/shard-{shard}.safetensors",
    output:
        "verified/shard-{shard}.json",
    shell:
        "touch {output}"


rule manifest:
    input:
        expand("verified/shard-{shard}.json", shard=SHARDS),
    output:
        "manifest.json",
    localrule: True
    shell:
        "touch {output}"
"""

# Each setting's command-line flags; `default` is Snakemake's own choice (the ILP scheduler).
SETTINGS = {
    "default": [],
    "greedy": ["--scheduler", "greedy"],
    "greedy-subsample": ["--scheduler", "greedy", "--scheduler-subsample", "100"],
}


def snakemake_seconds(workdir: Path, shards: int, flags: list[str], dry: bool) -> float:
    """Wall seconds of one snakemake run of the generated workflow."""
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--cores",
        "4",
        "--resources",
        "gpu=4",
        "--config",
        f"shards={shards}",
        "--quiet",
        "all",
        *flags,
        *(["--dry-run"] if dry else []),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - started


def cost_per_job(shards: int, flags: list[str]) -> tuple[float, float]:
    """(DAG seconds, scheduling seconds per job) for one fresh run at `shards`."""
    workdir = Path(tempfile.mkdtemp(prefix="scheduler-scaling-"))
    try:
        (workdir / "Snakefile").write_text(SNAKEFILE)
        dag = snakemake_seconds(workdir, shards, flags, dry=True)
        run = snakemake_seconds(workdir, shards, flags, dry=False)
        return dag, (run - dag) / (2 * shards + 2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[300, 3000, 6000])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["greedy-subsample"])
    parser.add_argument("--rounds", type=int, default=1, help="fresh runs per point; min and max are printed")
    args = parser.parse_args()
    print("| setting | shards | jobs | DAG s | scheduling ms/job (min / max) |")
    print("|---|---|---|---|---|")
    for setting in args.settings:
        for shards in args.shards:
            points = [cost_per_job(shards, SETTINGS[setting]) for _ in range(args.rounds)]
            per_job = [1000 * cost for _, cost in points]
            dag = min(seconds for seconds, _ in points)
            print(
                f"| {setting} | {shards} | {2 * shards + 2} | {dag:.1f} | {min(per_job):.1f} / {max(per_job):.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
