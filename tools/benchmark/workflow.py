"""The --workflow mode: the whole workflow through `snakemake` against Automodel's precompute_eagle3 CLI.

Both sides go from raw conversations to a complete cache, as a new user runs them: ours is the
`snakemake` command line on a fresh working directory with a generated config, run to the
manifest (the cache's commit point); the validation report is a second `snakemake` call on the
finished cache, measured apart. The reference is `python -m tools.benchmark.reference_cli`, which
runs Automodel's own CLI (see there). Rounds alternate, every run in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import yaml

from eagle3_cache.layout import MANIFEST_FILE

from .compare import compared_compute_dtypes, print_parity, print_table, shard_parity, spread, workload_line
from .measure import CommandCost, log_tail, measured_command
from .workload import REPO, Workload, workload_from

RUN = "bench"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
# What eagle3_cache.logs.logged_wall_split logs at the end of a job.
WALL_SPLIT = re.compile(r"started ([\d.]+)s after process start \(imports\), work ([\d.]+)s")
SHARD_SUFFIX = re.compile(r"-\d{6}$")


def workflow_benchmark(args: argparse.Namespace, work: Path) -> dict:
    """Alternating rounds of our workflow and the reference CLI, and the parity of their first caches."""
    workload = replace(workload_from(args, work), threads=args.cores)
    gpus = max(1, torch.cuda.device_count()) if workload.device != "cpu" else 1
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    for round_number in range(1, args.rounds + 1):
        print(f"round {round_number}/{args.rounds}: ours (snakemake) ...", flush=True)
        load = os.getloadavg()[0]
        runs["ours"].append({**run_workflow(workload, args.cores, gpus, work / f"ours-{round_number}"), "load": load})
        print(f"round {round_number}/{args.rounds}: reference (precompute_eagle3) ...", flush=True)
        load = os.getloadavg()[0]
        runs["reference"].append({**run_precompute(workload, work / f"reference-{round_number}"), "load": load})
    report = {
        "workload": asdict(workload),
        "snakemake": snakemake_command(args.cores, gpus),
        "runs": runs,
        "parity": cache_parity(work / "ours-1", work / "reference-1" / "cache", workload, runs["ours"][0]["samples"]),
        "load_average": (load_before, os.getloadavg()[0]),
    }
    print_workflow(report)
    return report


def workflow_config(workload: Workload) -> dict:
    """The generated config: one run of the workload. Validation is not strict: its verdict is reported."""
    run = {
        "target_model": workload.model,
        "input_data": workload.conversations,
        "seq_length": workload.seq_length,
        "draft_vocab_size": workload.draft_vocab_size,
        "dtype": workload.dtype,
        "compute_dtype": workload.compute_dtype,
        "batch_size": workload.batch_size,
        "shard_size": workload.shard_size,
    }
    return {"runs": {RUN: run}, "device": workload.device, "validation": {"strict": False}}


def snakemake_command(cores: int, gpus: int, *targets: str) -> list[str]:
    """The workflow's command line on the config in the working directory."""
    # Targets first: --resources takes every word after it.
    return [
        *(SNAKEMAKE, *targets, "--snakefile", str(REPO / "Snakefile"), "--configfile", "config.yaml"),
        *("--replace-workflow-config", "--cores", str(cores), "--resources", f"gpu={gpus}"),
    ]


def checked_cost(command: list[str], cwd: Path, log_path: Path) -> CommandCost:
    """`measured_command`, or an error with the end of its log when the command fails."""
    cost = measured_command(command, cwd, log_path)
    if cost.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed (exit {cost.returncode}); end of {log_path}:\n{log_tail(log_path)}"
        )
    return cost


def run_workflow(workload: Workload, cores: int, gpus: int, directory: Path) -> dict:
    """Our workflow in a fresh directory: to the manifest, then the validation report; what each cost."""
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(workflow_config(workload)))
    results = directory / "results" / RUN
    manifest = results.relative_to(directory) / "shards" / MANIFEST_FILE
    cache = checked_cost(snakemake_command(cores, gpus, str(manifest)), directory, directory / "snakemake-cache.log")
    validation = checked_cost(snakemake_command(cores, gpus), directory, directory / "snakemake-validation.log")
    return {
        "cache": asdict(cache),
        "validation": asdict(validation),
        "validation_passed": json.loads((results / "validation.json").read_text())["passed"],
        "cache_bytes": folder_bytes(results / "shards"),
        "fixed_cost": fixed_costs(directory / "logs" / RUN),
        **our_forwards(results / "shard_stats"),
    }


def our_forwards(stats_dir: Path) -> dict:
    """Samples, positions through the target and forward seconds, summed over the shard jobs' stats."""
    stats = [json.loads(path.read_text()) for path in sorted(stats_dir.glob("shard-*.json"))]
    return {
        "samples": sum(shard["num_samples"] for shard in stats),
        "real_tokens": sum(shard["real_tokens"] for shard in stats),
        "positions": sum(shard["computed_tokens"] for shard in stats),
        "forwards": sum(shard["positions_per_forward"]["forwards"] for shard in stats),
        "forward_seconds": sum(shard["seconds"]["forward"] for shard in stats),
        "distribution_seconds": sum(shard["seconds"]["distribution"] for shard in stats),
    }


def fixed_costs(log_dir: Path) -> dict[str, dict]:
    """Per rule: its jobs, how many logged a wall split, and their process start + imports and work, summed."""
    costs: dict[str, dict] = {}
    for path in sorted(log_dir.glob("*.log")):
        cost = costs.setdefault(
            SHARD_SUFFIX.sub("", path.stem), {"jobs": 0, "logged": 0, "imports_seconds": 0.0, "work_seconds": 0.0}
        )
        cost["jobs"] += 1
        if split := WALL_SPLIT.search(path.read_text()):
            cost["logged"] += 1
            cost["imports_seconds"] += float(split[1])
            cost["work_seconds"] += float(split[2])
    return costs


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir() if path.is_file())


def precompute_flags(workload: Workload, output: Path) -> list[str]:
    """precompute_eagle3's flags for the workload."""
    from eagle3_cache.target import resolve_device

    return [
        *("--target-model", workload.model, "--input-data", workload.conversations, "--output-dir", str(output)),
        *("--seq-length", str(workload.seq_length), "--draft-vocab-size", str(workload.draft_vocab_size)),
        *("--batch-size", str(workload.batch_size), "--shard-size", str(workload.shard_size)),
        *("--dtype", workload.dtype, "--device", resolve_device(workload.device).type),
    ]


def run_precompute(workload: Workload, directory: Path) -> dict:
    """Automodel's CLI in a fresh process, writing a fresh cache; what it cost and its forward timings."""
    directory.mkdir(parents=True)
    stats_path = directory / "forward-stats.json"
    command = [
        *(sys.executable, "-m", "tools.benchmark.reference_cli", str(stats_path), str(workload.threads), "--"),
        *precompute_flags(workload, directory / "cache"),
    ]
    cost = checked_cost(command, REPO, directory / "precompute.log")
    return {
        "cache": asdict(cost),
        "cache_bytes": folder_bytes(directory / "cache"),
        **json.loads(stats_path.read_text()),
    }


def cache_parity(ours: Path, reference_cache: Path, workload: Workload, samples: int) -> dict:
    """Our workflow's cache against the CLI's, under the validation report's parity rule."""
    from eagle3_cache.vocab_selection import read_vocab_selection

    our_ids = read_vocab_selection(ours / "results" / RUN / "vocab_selection.pt")[0]
    reference_ids = json.loads((reference_cache / MANIFEST_FILE).read_text())["selected_token_ids"]
    return shard_parity(
        ours / "results" / RUN / "shards",
        reference_cache,
        workload,
        samples,
        compute_dtypes=compared_compute_dtypes(workload),
        same_vocab=our_ids.tolist() == reference_ids,
    )


def per_kilo_position(seconds_key: str, *more: str):
    """A metric: those seconds of a run per thousand positions through the target."""
    return lambda run: 1e3 * sum(run[key] for key in (seconds_key, *more)) / run["positions"]


WORKFLOW_METRICS = [
    ("wall to a complete cache (s)", lambda run: run["cache"]["wall"], "{:.1f}"),
    ("CPU time, user+sys (s)", lambda run: run["cache"]["cpu"], "{:.1f}"),
    ("peak RSS, process tree (MiB)", lambda run: run["cache"]["tree_rss_mib"], "{:.0f}"),
    ("peak RSS, one process (MiB)", lambda run: run["cache"]["max_rss_mib"], "{:.0f}"),
    ("forward + distribution (s)", lambda run: run["forward_seconds"] + run["distribution_seconds"], "{:.1f}"),
    ("forward s / 1k positions", per_kilo_position("forward_seconds"), "{:.3f}"),
    ("+ distribution s / 1k pos.", per_kilo_position("forward_seconds", "distribution_seconds"), "{:.3f}"),
]


def spread_text(values: list[float], fmt: str = "{:.1f}") -> str:
    """median (min–max)."""
    low, median, high = spread(values)
    return f"{fmt.format(median)} ({fmt.format(low)}–{fmt.format(high)})"


def print_workflow(report: dict) -> None:
    workload, ours, reference = report["workload"], report["runs"]["ours"], report["runs"]["reference"]
    print()
    print(workload_line(report, f"{len(ours)} alternating rounds, fresh directories and processes"))
    print(
        f"ours: snakemake results/{RUN}/shards/{MANIFEST_FILE} {' '.join(report['snakemake'][1:])} (the cache), "
        "then the same command without a target (the validation report)"
    )
    print(
        f"reference: python -m nemo_automodel.components.speculative.precompute_eagle3 (model through "
        f"{reference[0]['model_loader']}), torch threads {workload['threads']}"
    )
    print_table(ours, reference, WORKFLOW_METRICS)
    print(
        "1-minute load average as each run began: "
        + ", ".join(
            f"round {n}: ours {a['load']:.1f}, reference {b['load']:.1f}"
            for n, (a, b) in enumerate(zip(ours, reference, strict=True), start=1)
        )
    )
    print()
    print_validation(ours)
    print_positions(ours[0], reference[0])
    print_fixed_costs(ours, reference)
    print_parity(report["parity"], "parity of the round-1 caches")
    print(
        f"cache size: ours {ours[0]['cache_bytes'] / 1e6:.4g} MB, reference {reference[0]['cache_bytes'] / 1e6:.4g} MB"
    )


def print_validation(ours: list[dict]) -> None:
    """The validation call's cost, and the whole of ours with it."""
    validation = [run["validation"] for run in ours]
    verdicts = {"PASS" if run["validation_passed"] else "FAIL" for run in ours}
    print(
        f"ours, validation report (a second snakemake call on the finished cache; not in the table): wall "
        f"{spread_text([v['wall'] for v in validation])}s, CPU {spread_text([v['cpu'] for v in validation])}s, "
        f"peak RSS {spread_text([v['tree_rss_mib'] for v in validation], '{:.0f}')} MiB; {'/'.join(sorted(verdicts))}; "
        f"cache + validation wall {spread_text([run['cache']['wall'] + run['validation']['wall'] for run in ours])}s"
    )


def print_positions(ours: dict, reference: dict) -> None:
    print(
        f"positions through the target: ours {ours['positions']} in {ours['forwards']} forwards, reference "
        f"{reference['positions']} in {reference['forwards']} ({ours['real_tokens']} real). Forward: ours the "
        "shard stats' forward phase (the decoder; for Llama, Mistral and Qwen the output layer runs on the draft "
        "rows in the distribution phase), the reference's timed HFEagle3TargetModel.generate_batch (the whole "
        "model, full-vocabulary logits); distribution: our phase, their _compute_batch_cache"
    )


def print_fixed_costs(ours: list[dict], reference: list[dict]) -> None:
    """Each rule's process start + imports and work (median over rounds of the sums over its jobs)."""
    rules = ours[0]["fixed_cost"]
    logged, unlogged = [], []
    for rule, cost in rules.items():
        if not cost["logged"]:
            unlogged.append(f"{rule} ({cost['jobs']})")
            continue
        imports = statistics.median(run["fixed_cost"][rule]["imports_seconds"] for run in ours)
        work = statistics.median(run["fixed_cost"][rule]["work_seconds"] for run in ours)
        logged.append(f"{rule} ×{cost['jobs']}: start + imports {imports:.1f}s, work {work:.1f}s")
    startup = [run["startup_seconds"] for run in reference if run["startup_seconds"] is not None]
    print(
        "ours, fixed cost per rule (median over rounds, summed over its jobs): " + "; ".join(logged) + ". "
        "No wall split logged (jobs): " + (", ".join(unlogged) or "none") + ". "
        f"Reference, its one process's start + imports: {spread_text(startup)}s"
    )
