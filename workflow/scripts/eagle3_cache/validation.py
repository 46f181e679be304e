"""Validation of a finished cache: the eight checks, and the report they write.

The report job aggregates what other jobs found where the data was: each shard's verification
record (`verified/*.json`: size, header, sha256 and the numeric scan, read back from disk), the
live parity job's `parity.json`, the shard stats and the tokenized store's statistics. It opens
no shard and needs no GPU.

Each check is a function returning a `CheckResult` (passed or not, a one-line summary, figures,
series for tables and charts, details). `validate_cache` runs them all; a check that cannot run
(an unreadable file, a missing manifest) is a failed check, never a crash, so a report is always
written. `write_report` writes it as HTML (`report_html`) and JSON.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import CACHE_SEMANTICS_VERSION
from .atomic import atomic_output, write_json_atomic
from .layout import EMBEDDINGS_FILE, MANIFEST_FILE, shard_file_name, shard_index
from .manifest import read_shard_stats
from .report_html import format_bytes, format_seconds, render_html
from .results import TITLES, CheckResult, ValidationReport, listed, problems_summary
from .scan import MIN_DRAFT_SHARE, merged_scans, sanity_check, supervision_check
from .shard_format import ShardLayout, committed_manifest, directory_problems, read_manifest, shard_bytes_by_layout
from .token_store import TokenizedInfo, read_tokenized_info
from .verification import verification_problems
from .vocab import read_vocab_selection

log = logging.getLogger(__name__)

PROJECTED_SAMPLES = {"100k": 100_000, "1M": 1_000_000}


@dataclass(frozen=True)
class ValidationInputs:
    """The files of one run that validation reads: none of them a shard."""

    run: str
    cache_dir: Path
    tokenized: Path
    selection: Path
    counts: Path
    stats: Sequence[Path]
    verified: Sequence[Path]  # the verification records, one per shard
    parity: Path  # the live parity job's result
    benchmarks: Sequence[Path]


# --- 1. Complete and intact ------------------------------------------------------------------


def integrity_check(cache_dir: Path, verified: Sequence[Mapping[str, Any]]) -> CheckResult:
    """The directory against its manifest, and each shard's verification against the manifest's record of it."""
    manifest, problems = committed_manifest(cache_dir)
    if manifest is not None:
        problems = directory_problems(cache_dir, manifest) + verification_problems(manifest, verified)
    problems = [str(problem) for problem in problems]
    figures = {
        "shard_files": len(manifest["shards"]) if manifest else 0,
        "verified_shards": len(verified),
        "verified_bytes": sum(record["bytes"] for record in verified),
        "problems": len(problems),
    }
    if problems:
        return CheckResult("integrity", False, problems_summary(problems), figures, details=problems)
    summary = (
        f"all {len(verified)} shards present and verified on disk: sizes, headers, keys, shapes, dtypes "
        "and sha256 as recorded"
    )
    return CheckResult("integrity", True, summary, figures)


# --- 2. Live parity: its own job (`live_parity`), which holds the GPUs -------------------------


def parity_from_job(path: Path) -> CheckResult:
    """The live parity job's result."""
    return CheckResult.from_json(json.loads(path.read_text()))


# --- 3. Numerically sane and 4. Supervision: in `scan`, from the shards' verification records --


# --- 5. Draft vocabulary -----------------------------------------------------------------------


def coverage_curve(counts: np.ndarray, marked_size: int, points: int = 200) -> list[list[float]]:
    """`[size, share]` points: the share of supervised tokens the `size` most frequent ids cover.

    Sizes are spaced evenly on a log scale (and include `marked_size`), so a 150k-id vocabulary
    needs a few hundred points, not one per id.
    """
    covered = np.cumsum(np.sort(counts)[::-1]) / max(int(counts.sum()), 1)
    sizes = np.unique(np.round(np.logspace(0, math.log10(len(counts)), points)).astype(np.int64))
    sizes = np.union1d(sizes, [min(max(marked_size, 1), len(counts))])
    return [[int(size), float(covered[size - 1])] for size in sizes]


def vocabulary_check(counts: np.ndarray, manifest: Mapping[str, Any], selection: Path) -> CheckResult:
    """Coverage of the supervised tokens by the draft vocabulary, and that the manifest's is the one selected."""
    selected, _ = read_vocab_selection(selection)
    size = int(manifest["draft_vocab_size"])
    total = int(counts.sum())
    covered = int(counts[selected.numpy()].sum())
    ranked = np.cumsum(np.sort(counts)[::-1])
    figures = {
        "target_vocab_size": int(manifest["target_vocab_size"]),
        "draft_vocab_size": size,
        "distinct_supervised_tokens": int((counts > 0).sum()),
        "coverage_share": covered / total if total else 0.0,
        "best_coverage_at_size_share": float(ranked[size - 1] / total) if total else 0.0,
        "ids_for_95_percent": int(np.searchsorted(ranked, 0.95 * total) + 1) if total else 0,
        "ids_for_99_percent": int(np.searchsorted(ranked, 0.99 * total) + 1) if total else 0,
    }
    series = {"coverage_curve": coverage_curve(counts, size)}
    problems = []
    if selected.tolist() != list(manifest["selected_token_ids"]):
        problems.append(
            "manifest.json's selected_token_ids differ from vocab_selection.pt: the cache used another selection"
        )
    if not total:
        problems.append("vocab_counts.npy counts no supervised token")
    elif covered / total < MIN_DRAFT_SHARE:
        problems.append(f"the draft vocabulary covers only {covered / total:.1%} of the supervised tokens")
    if problems:
        return CheckResult("vocabulary", False, problems[0], figures, series, problems)
    summary = (
        f"{size:,} of {figures['target_vocab_size']:,} ids cover {covered / total:.2%} of {total:,} supervised tokens"
    )
    return CheckResult("vocabulary", True, summary, figures, series)


# --- 6. Disk -----------------------------------------------------------------------------------


def disk_check(cache_dir: Path, manifest: Mapping[str, Any], info: TokenizedInfo) -> CheckResult:
    """Bytes per sample and per field, padding's share, and the size of a larger dataset of the same shape."""
    layout = ShardLayout.from_manifest(manifest)
    n = int(manifest["num_samples"])
    field_bytes = {f.name: f.sample_bytes for f in layout.fields()}
    per_sample = sum(field_bytes.values())
    records = manifest["shards"]
    unexplained = [
        r["file"] for r in records if shard_bytes_by_layout(layout, int(r["num_samples"])) != int(r["bytes"])
    ]
    shard_bytes = sum(int(r["bytes"]) for r in records)
    embeddings = cache_dir / EMBEDDINGS_FILE
    embeddings_bytes = embeddings.stat().st_size if embeddings.exists() else 0
    padding_share = 1 - float(info.lengths.sum()) / (n * layout.seq_length)
    figures = {
        "num_samples": n,
        "shards": len(records),
        "per_sample_bytes": per_sample,
        "shard_bytes": shard_bytes,
        "embeddings_bytes": embeddings_bytes,
        "total_bytes": shard_bytes + embeddings_bytes,
        "allocated_bytes": allocated_bytes([cache_dir / r["file"] for r in records] + [embeddings]),
        "padding_share": padding_share,
        "padding_bytes": round(padding_share * n * per_sample),
        **{
            f"projected_{name}_samples_bytes": count * per_sample + embeddings_bytes
            for name, count in PROJECTED_SAMPLES.items()
        },
    }
    series = {
        "fields": [
            {"field": name, "per_sample_bytes": size, "total_bytes": size * n, "of_the_cache_share": size / per_sample}
            for name, size in field_bytes.items()
        ]
    }
    if unexplained:
        summary = (
            f"{len(unexplained)} shard(s) whose recorded size the layout does not explain: {', '.join(unexplained)}"
        )
        return CheckResult("disk", False, summary, figures, series, [summary])
    summary = (
        f"{format_bytes(shard_bytes + embeddings_bytes)} in all "
        f"({format_bytes(figures['allocated_bytes'])} allocated), "
        f"{format_bytes(per_sample)} per sample, {padding_share:.1%} of positions are padding"
    )
    return CheckResult("disk", True, summary, figures, series)


def allocated_bytes(paths: Sequence[Path]) -> int:
    """Disk blocks the files take: less than their size where the never-written padding stays a sparse hole.

    A copy that does not keep holes (object storage, `rsync` without `-S`) takes the full size.
    """
    return sum(path.stat().st_blocks * 512 for path in paths if path.exists())


# --- 7. Cost -----------------------------------------------------------------------------------


def read_benchmark(path: Path) -> dict[str, float | None]:
    """The first row of a Snakemake benchmark file (`s`, `max_rss` in MB, ...); "NA" becomes None."""
    with open(path, newline="") as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    return {key: None if value in ("NA", "-", "") else float(value) for key, value in row.items() if key != "h:m:s"}


def shard_cost_row(stats: Mapping[str, Any], benchmark: Mapping[str, float | None] | None) -> dict[str, Any]:
    """One shard job's time and throughput."""
    seconds = stats["seconds"]
    total, load = float(seconds.get("total", 0.0)), float(seconds.get("load", 0.0))
    return {
        "shard": stats["shard"],
        "samples": stats["num_samples"],
        "job_seconds": total,
        "load_seconds": load,
        "forward_seconds": float(seconds.get("forward", 0.0)),
        "write_seconds": float(seconds.get("write", 0.0)),
        "real_tokens": stats["real_tokens"],
        "tokens_per_second": stats["real_tokens"] / total if total else 0.0,
        "load_share": load / total if total else 0.0,
        # The part of the padded [samples, seq_length] grid the target ran on; trimming skipped the rest.
        "positions_computed_share": (
            stats["computed_tokens"] / stats["padded_tokens"] if stats["padded_tokens"] else 0.0
        ),
        "benchmark_seconds": benchmark.get("s") if benchmark else None,
        "max_rss_mb": benchmark.get("max_rss") if benchmark else None,
        "device": stats.get("device"),
    }


def cost_check(
    stats: Sequence[Mapping[str, Any]],
    benchmarks: Sequence[Path],
    shard_count: int,
    verified: Sequence[Mapping[str, Any]],
    parity: CheckResult,
) -> CheckResult:
    """Per shard job: wall time, model load, tokens per second, and Snakemake's benchmark when present; and
    what validating took: the verification jobs' seconds and the GPU seconds of live parity, its only GPU step."""
    by_shard = {shard_index(path): read_benchmark(path) for path in benchmarks if path.exists()}
    rows = [shard_cost_row(s, by_shard.get(s["shard"])) for s in sorted(stats, key=lambda s: s["shard"])]
    job_seconds = sum(r["job_seconds"] for r in rows)
    load_seconds = sum(r["load_seconds"] for r in rows)
    real_tokens = sum(r["real_tokens"] for r in rows)
    computed, padded = sum(s["computed_tokens"] for s in stats), sum(s["padded_tokens"] for s in stats)
    figures = {
        "shard_jobs": len(rows),
        "job_seconds": job_seconds,
        "load_seconds": load_seconds,
        "load_share": load_seconds / job_seconds if job_seconds else 0.0,
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
        f"model loading is {figures['load_share']:.0%} of job time"
    )
    return CheckResult("cost", True, summary, figures, {"shards": rows})


# --- 8. Provenance -----------------------------------------------------------------------------

REQUIRED_PROVENANCE = (
    "target_model_identity",
    "tokenizer_sha256",
    "chat_template_sha256",
    "settings_fingerprint",
    "producer",
    "packages",
)
SETTING_KEYS = (
    "target_model",
    "revision",
    "trust_remote_code",
    "input_data",
    "split",
    "shuffle_seed",
    "seq_length",
    "dtype",
    "shard_size",
    "num_samples",
    "target_vocab_size",
    "draft_vocab_size",
    "target_probs_topk",
    "aux_layer_ids",
    "aux_hidden_dim",
    "mask_reasoning_content",
    "mask_generation_prompt",
    "format_version",
    "settings_fingerprint",
)


def provenance_disagreements(
    manifest: Mapping[str, Any], info: TokenizedInfo, stats: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Where the manifest's record of its origin disagrees with the tokenized store or the shard stats."""
    problems = []
    if manifest.get("tokenizer_sha256") != info.tokenizer_hash:
        problems.append(
            "tokenizer_sha256 differs from the tokenized store's: shards and tokens come from different tokenizers"
        )
    if manifest.get("chat_template_sha256") != info.chat_template_hash:
        problems.append("chat_template_sha256 differs from the tokenized store's")
    for key in ("input_data", "split", "shuffle_seed"):
        if manifest.get(key) != info.source.get(key):
            problems.append(f"{key} is {manifest.get(key)!r}, the tokenized store says {info.source.get(key)!r}")
    for s in stats:
        if s["model_identity"] != manifest.get("target_model_identity"):
            problems.append(f"{shard_file_name(s['shard'])} was computed by another target: {s['model_identity']}")
        if s["settings_fingerprint"] != manifest.get("settings_fingerprint"):
            problems.append(f"{shard_file_name(s['shard'])} was computed under other settings")
    return problems


def provenance_check(
    manifest: Mapping[str, Any], info: TokenizedInfo, stats: Sequence[Mapping[str, Any]]
) -> CheckResult:
    """Target, tokenizer, data, settings, packages and producer, as the manifest records them."""
    identity = manifest.get("target_model_identity") or {}
    figures = {
        "target_model": manifest.get("target_model"),
        "revision": manifest.get("revision"),
        "commit": identity.get("commit"),
        "config_sha256": identity.get("config_sha256"),
        "weight_files_sha256": identity.get("weight_files_sha256"),
        "tokenizer_sha256": manifest.get("tokenizer_sha256"),
        "chat_template_sha256": manifest.get("chat_template_sha256"),
        "producer": manifest.get("producer"),
        "packages": manifest.get("packages"),
    }
    series = {"settings": [{"setting": key, "value": manifest.get(key)} for key in SETTING_KEYS]}
    problems = [f"the manifest does not record {key}" for key in REQUIRED_PROVENANCE if not manifest.get(key)]
    problems += provenance_disagreements(manifest, info, stats)
    details = list(problems)
    built_under = (manifest.get("producer") or {}).get("cache_semantics_version")
    if built_under is not None and built_under != CACHE_SEMANTICS_VERSION:
        details.append(
            f"built under cache semantics {built_under}, this validator's are {CACHE_SEMANTICS_VERSION}: "
            "live parity compares against today's computation"
        )
    if problems:
        return CheckResult("provenance", False, problems_summary(problems), figures, series, details)
    summary = (
        f"{manifest['target_model']} ({identity.get('commit') or 'local'}), "
        "tokenizer and template hashed, all settings recorded"
    )
    return CheckResult("provenance", True, summary, figures, series, details)


# --- Running the checks ------------------------------------------------------------------------


def run_check(key: str, check: Callable[[], CheckResult]) -> CheckResult:
    """`check()`, timed; if it cannot run, a failed result saying why."""
    started = time.perf_counter()
    try:
        result = check()
    except Exception as error:  # a check that cannot run is a failure to report, not a reason to write no report
        log.exception("check %r could not run", key)
        result = CheckResult(key, False, f"could not run: {type(error).__name__}: {error}", details=[str(error)])
    seconds = time.perf_counter() - started
    log.info("%s: %s in %.1fs: %s", TITLES[key], "PASS" if result.passed else "FAIL", seconds, result.summary)
    return replace(result, seconds=seconds)


def validate_cache(inputs: ValidationInputs) -> ValidationReport:
    """Run every check on one run's cache, from the records the other jobs wrote (no shard is read)."""
    manifest = functools.cache(lambda: read_manifest(inputs.cache_dir))
    info = functools.cache(lambda: read_tokenized_info(inputs.tokenized))
    parity = functools.cache(lambda: parity_from_job(inputs.parity))
    # A missing stats file or record is the cost or integrity check's finding, not a reason to stop.
    stats = read_shard_stats([path for path in inputs.stats if path.exists()])
    verified = read_shard_stats([path for path in inputs.verified if path.exists()])
    scan = functools.cache(lambda: merged_scans([record["scan"] for record in verified]))
    checks = [
        run_check("integrity", lambda: integrity_check(inputs.cache_dir, verified)),
        run_check("parity", parity),
        run_check("sanity", lambda: sanity_check(scan(), int(manifest()["num_samples"]))),
        run_check("supervision", lambda: supervision_check(scan(), info())),
        run_check("vocabulary", lambda: vocabulary_check(np.load(inputs.counts), manifest(), inputs.selection)),
        run_check("disk", lambda: disk_check(inputs.cache_dir, manifest(), info())),
        run_check("cost", lambda: cost_check(stats, inputs.benchmarks, len(inputs.stats), verified, parity())),
        run_check("provenance", lambda: provenance_check(manifest(), info(), stats)),
    ]
    generated_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return ValidationReport(inputs.run, str(inputs.cache_dir), checks, generated_at)


def failed_path(path: Path) -> Path:
    """Where a failed validation keeps its report: beside the output, under a name Snakemake does not own."""
    return path.with_name(f"{path.stem}.FAILED{path.suffix}")


def write_report(report: ValidationReport, html_path: Path, json_path: Path, strict: bool) -> Path | None:
    """Write the HTML and JSON reports; returns the kept path when `strict` and a check failed.

    A strict failure writes them under `*.FAILED.*` names, which survive the failed job (Snakemake
    deletes a failed job's declared outputs). A success removes such leftovers of an earlier failure.
    """
    failed_strictly = strict and not report.passed
    html_target = failed_path(html_path) if failed_strictly else html_path
    json_target = failed_path(json_path) if failed_strictly else json_path
    with atomic_output(html_target) as tmp:
        tmp.write_text(render_html(report), encoding="utf-8")
    write_json_atomic(json_target, report.to_json())
    if failed_strictly:
        return html_target
    for leftover in (failed_path(html_path), failed_path(json_path)):
        leftover.unlink(missing_ok=True)
    return None


def failure_message(report: ValidationReport, kept: Path) -> str:
    """What a strict failure tells the user."""
    return (
        f"validation of run {report.run!r} failed: {', '.join(report.failed_titles)}. "
        f"{MANIFEST_FILE} was retired, so trainers refuse {report.cache_dir}; the report is kept at {kept}. "
        "Fix the cause and run again, or accept the cache as it is with validation.strict: false "
        "(the next run then commits the manifest again and marks the failures in the report)."
    )
