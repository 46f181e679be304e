"""The default mode: alternating rounds of ours and the reference, their parity, and our per-job overhead."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from eagle3_cache.layout import num_shards, shard_file_name

from .measure import samples_per_s, tokens_per_s
from .workload import REPO, Workload, prepared_jobs, run_child, workload_from

SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
LOAD_SHARE_TARGET = 0.10  # of a shard job's time


def compare(args: argparse.Namespace, work: Path) -> dict:
    """Alternating rounds of ours and the reference, the parity check, and the job-overhead estimate."""
    workload = workload_from(args, work)
    job, prepared = prepared_jobs(workload, work)
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    verdict = None
    for round_number in range(1, args.rounds + 1):
        for side in runs:
            output = work / f"{side}-shards"
            shutil.rmtree(output, ignore_errors=True)
            print(f"round {round_number}/{args.rounds}: {side} ...", flush=True)
            runs[side].append(run_child(side, {**job, "output": str(output)}, work))
        if verdict is None:
            verdict = parity(work / "ours-shards", work / "reference-shards", job, runs["ours"][0]["samples"])
    report = {
        "workload": asdict(workload),
        "prepare": prepared,
        "runs": runs,
        "parity": verdict,
        "load_average": (load_before, os.getloadavg()[0]),
        "job_overhead": job_overhead(runs["ours"], workload),
    }
    print_comparison(report)
    return report


def parity(ours: Path, reference: Path, job: dict, samples: int) -> dict:
    """Our shards against the reference's, under the validation report's rule (see `shard_parity`)."""
    from eagle3_cache.vocab_selection import read_vocab_selection

    workload = Workload(**job["workload"])
    return shard_parity(
        ours,
        reference,
        workload,
        samples,
        compute_dtypes=compared_compute_dtypes(workload),
        same_vocab=torch.equal(
            torch.from_numpy(read_vocab_selection(job["selection"])[0]), torch.load(reference / "selected_token_ids.pt")
        ),
    )


def compared_compute_dtypes(workload: Workload) -> set[torch.dtype]:
    """What ours (its compute_dtype) and the reference (Automodel's choice, our `auto`) computed in."""
    from eagle3_cache.target import compute_dtype, resolve_device

    device = resolve_device(workload.device)
    return {compute_dtype(device, workload.compute_dtype), compute_dtype(device)}


def shard_parity(
    ours: Path, reference: Path, workload: Workload, samples: int, compute_dtypes: set[torch.dtype], same_vocab: bool
) -> dict:
    """Two caches' shards under the validation report's rule (`eagle3_cache.parity`).

    Ids and masks exactly (position_mask may flip at near ties only with bf16/fp16 compute);
    float fields within the report's tolerance where attention_mask is 1.
    """
    from eagle3_cache.parity import FLOAT_FIELDS, parity_outcome
    from eagle3_cache.shard_format import DTYPES

    problems = [] if same_vocab else ["the draft vocabularies differ"]
    outcome = parity_outcome(
        paired_rows(ours, reference, num_shards(samples, workload.shard_size), workload.shard_size, problems),
        shard_size=workload.shard_size,
        draft_vocab_size=workload.draft_vocab_size,
        cache_dtype=DTYPES[workload.dtype],
        compute_dtypes=compute_dtypes,
    )
    problems += outcome.problems
    fields = {row["field"]: row for row in outcome.fields if row["field"] in FLOAT_FIELDS}
    return {
        "identical": not problems,
        "problems": problems,
        "position_mask_flips": outcome.position_mask_flips,
        "max_abs_diff": {field: row["max_abs_error"] for field, row in fields.items()},
        "max_diff_of_position_max": {field: row["max_rel_error"] for field, row in fields.items()},
        "max_distance": {field: row["max_distance"] for field, row in fields.items()},
        "rule": outcome.tolerance.rule,
    }


def paired_rows(
    ours: Path, reference: Path, shards: int, shard_size: int, problems: list[str]
) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """(sample, our rows, the reference's rows), one shard in memory at a time.

    A shard whose fields differ from the reference's is not compared: it is added to `problems`.
    """
    for index in range(shards):
        name = shard_file_name(index)
        mine, theirs = load_file(ours / name), load_file(reference / name)
        if mine.keys() != theirs.keys():
            problems.append(f"{name}: fields {sorted(mine)}, the reference's {sorted(theirs)}")
            continue
        for row in range(len(theirs["input_ids"])):
            our_row = {field: values[row] for field, values in mine.items()}
            reference_row = {field: values[row] for field, values in theirs.items()}
            yield index * shard_size + row, our_row, reference_row


def schema_default_shard_size() -> int:
    """The workflow's default shard_size, from its config schema."""
    schema = yaml.safe_load(SCHEMA.read_text())
    return int(schema["$defs"]["run"]["properties"]["shard_size"]["default"])


def job_overhead(ours: list[dict], workload: Workload) -> dict:
    """Model load, and process start + imports, as shares of a shard job at the workflow's default shard_size.

    A job = process start and imports + model load + one shard. Also the smallest shard sizes (multiples
    of the batch size) at which the load, and the load with the start, stay within LOAD_SHARE_TARGET.
    """
    default = schema_default_shard_size()
    rate = statistics.median(samples_per_s(run) for run in ours)
    load = statistics.median(run["load_seconds"] for run in ours)
    startup = statistics.median(run["wall_seconds"] - run["seconds"] - run["load_seconds"] for run in ours)
    job_seconds = startup + load + default / rate

    def smallest_shard_size(overhead: float) -> int:
        needed = (1 - LOAD_SHARE_TARGET) / LOAD_SHARE_TARGET * overhead * rate
        return max(1, int(np.ceil(needed / workload.batch_size))) * workload.batch_size

    return {
        "default_shard_size": default,
        "load_seconds": load,
        "startup_seconds": startup,
        "job_seconds": job_seconds,
        "load_share": load / job_seconds,
        "overhead_share": (startup + load) / job_seconds,
        "shard_size_for_load": smallest_shard_size(load),
        "shard_size_for_load_and_start": smallest_shard_size(load + startup),
    }


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    return min(values), statistics.median(values), max(values)


METRICS: list[tuple[str, Callable[[dict], float], str]] = [
    ("samples/s", samples_per_s, "{:.3g}"),
    ("real tokens/s", tokens_per_s, "{:.4g}"),
    ("peak RSS (MiB)", lambda run: run["peak_rss_mib"], "{:.0f}"),
    ("RSS after model load (MiB)", lambda run: run["loaded_rss_mib"], "{:.0f}"),
    ("model load (s)", lambda run: run["load_seconds"], "{:.2f}"),
    ("shard loop (s)", lambda run: run["seconds"], "{:.1f}"),
    ("shard loop CPU time (s)", lambda run: run["cpu_seconds"], "{:.1f}"),
    ("samples per CPU second", lambda run: run["samples"] / run["cpu_seconds"], "{:.3g}"),
]


def workload_line(report: dict, how: str) -> str:
    """The report's first line: the model, samples and settings, `how` the rounds ran, and the load average."""
    workload, ours = report["workload"], report["runs"]["ours"]
    return (
        f"model {workload['model']}; {ours[0]['samples']} samples, {ours[0]['real_tokens']} real tokens; "
        f"seq_length {workload['seq_length']}, draft vocab {workload['draft_vocab_size']}, {workload['dtype']}, "
        f"batch {workload['batch_size']}, shard size {workload['shard_size']}, device {workload['device']}, "
        f"our compute_dtype {workload['compute_dtype']}; "
        f"{how}; 1-minute load average {report['load_average'][0]:.1f} before, {report['load_average'][1]:.1f} after"
    )


def print_comparison(report: dict) -> None:
    workload, ours, reference = report["workload"], report["runs"]["ours"], report["runs"]["reference"]
    print()
    how = f"torch threads {workload['threads']}; {len(ours)} alternating rounds, one fresh process per run"
    print(workload_line(report, how))
    print_table(ours, reference)
    print()
    print_tokenizing(report["prepare"], ours, reference)
    phases = {name: statistics.median(run["phases"].get(name, 0.0) for run in ours) for name in ours[0]["phases"]}
    print("ours, shard-loop phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(phases.items())))
    print(
        f"positions run through the target: ours {ours[0]['computed_tokens']}, reference "
        f"{reference[0]['computed_tokens']} ({ours[0]['real_tokens']} real)"
    )
    print_parity(report["parity"])
    print_overhead(report["job_overhead"])


def print_table(
    ours: list[dict], reference: list[dict], metrics: Sequence[tuple[str, Callable[[dict], float], str]] = METRICS
) -> None:
    """Each metric's min / median / max over the rounds, and of the per-round ratio ours/reference."""
    header = (
        f"{'':28}{'ours min / median / max':>30}{'reference min / median / max':>34}{'ours/ref min / median / max':>33}"
    )
    print(header)
    print("-" * len(header))
    for label, metric, fmt in metrics:
        mine = spread([metric(run) for run in ours])
        theirs = spread([metric(run) for run in reference])
        ratio = spread([metric(a) / metric(b) for a, b in zip(ours, reference, strict=True)])
        cells = [" / ".join(fmt.format(v) for v in values) for values in (mine, theirs)]
        print(f"{label:28}{cells[0]:>30}{cells[1]:>34}{' / '.join(f'{v:.2f}' for v in ratio):>33}")


def print_tokenizing(prepared: dict, ours: list[dict], reference: list[dict]) -> None:
    """Where each side tokenizes, and the ratio with the reference's in-loop tokenizing taken out."""
    print(
        f"ours, once before the rounds (not in the shard loop): tokenize {prepared['tokenize_seconds']:.1f}s, "
        f"select vocab {prepared['vocab_seconds']:.1f}s"
    )
    in_loop = statistics.median(run["tokenize_in_loop_seconds"] for run in reference)
    vocab = statistics.median(run["vocab_seconds"] for run in reference)
    without = statistics.median(
        samples_per_s(mine) / (theirs["samples"] / (theirs["seconds"] - theirs["tokenize_in_loop_seconds"]))
        for mine, theirs in zip(ours, reference, strict=True)
    )
    print(
        f"reference, per run (median): token-mapping pass {vocab:.1f}s (tokenizes every sample; not in its shard "
        f"loop); tokenizing inside its shard loop {in_loop:.1f}s (counted in its throughput above); "
        f"ours/ref samples/s with that tokenizing taken out of the reference: {without:.2f}"
    )


def print_parity(verdict: dict, title: str = "parity (round 1)") -> None:
    largest = ", ".join(
        f"{field} {verdict['max_abs_diff'][field]:.3g} ({verdict['max_diff_of_position_max'][field]:.2g} of the "
        f"position's largest |value|; per-position distance {verdict['max_distance'][field]:.2g})"
        for field in verdict["max_abs_diff"]
    )
    rule = f"ids and masks exact; floats where attention_mask is 1: {verdict['rule']}"
    print(f"{title}: {'PASS' if verdict['identical'] else 'FAIL'}: {rule}; max |diff|: {largest}")
    for problem in verdict["problems"][:20]:
        print(f"  {problem}")


def print_overhead(overhead: dict) -> None:
    target = f"{LOAD_SHARE_TARGET:.0%}"
    print(
        f"job at the default shard_size {overhead['default_shard_size']}: {overhead['job_seconds']:.0f}s; model load "
        f"{overhead['load_seconds']:.2f}s = {overhead['load_share']:.1%} of it; with process start and imports "
        f"({overhead['startup_seconds']:.1f}s) {overhead['overhead_share']:.1%}. Smallest shard_size keeping the load "
        f"under {target}: {overhead['shard_size_for_load']}; load + start under {target}: "
        f"{overhead['shard_size_for_load_and_start']}"
    )
