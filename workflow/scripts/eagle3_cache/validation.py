"""Validation of a finished cache: the eight checks, and the report they write.

The report job aggregates what other jobs found where the data was: each shard's verification
record (`verified/*.json`: size, header, digest and the numeric scan, read back from disk), the
live parity job's `parity.json`, the shard stats, the disk plan and the tokenized store's
statistics. It opens no shard and needs no GPU.

Each check is a function returning a `CheckResult` (passed or not, a one-line summary, figures,
series for tables and charts, details). `validate_cache` runs them all: the shared ones and those of
the cache's format (`automodel_checks`, or `specforge_validation.specforge_checks`); a check that
cannot run (an unreadable file, a missing manifest) is a failed check, never a crash, so a report is
always written. `write_report` writes it as HTML (`report_html`) and JSON. The cost check is in `cost`.
"""

from __future__ import annotations

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
from .cache_dir import committed_manifest, directory_problems, read_manifest, verification_problems
from .cost import cost_check
from .disk_plan import planned_figures, planned_summary, read_plan
from .layout import EMBEDDINGS_FILE, MANIFEST_FILE, ROW_ORDER_SETTINGS, applied_settings, shard_file_name
from .manifest import read_shard_stats
from .report_html import render_html
from .results import TITLES, CheckResult, ValidationReport, problems_summary
from .scan_summary import MIN_DRAFT_SHARE, ScanSummary, merged_scans, sanity_check, supervision_check
from .shard_layout import ShardLayout
from .specforge_sizes import specforge_files_bytes
from .token_store import TokenizedInfo, read_tokenized_info
from .units import format_bytes
from .vocab_selection import read_vocab_selection

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
    plan: Path | None = None  # the disk plan, whose predictions the disk check compares with the cache


# --- 1. Complete and intact ------------------------------------------------------------------


def integrity_check(cache_dir: Path, verified: Sequence[Mapping[str, Any]]) -> CheckResult:
    """The directory against its manifest, and each shard's verification against the manifest's record of it."""
    manifest, problems = committed_manifest(cache_dir)
    if manifest is not None:
        problems = directory_problems(cache_dir, manifest) + verification_problems(manifest, verified)
    problems = [str(problem) for problem in problems]
    figures = {"shard_files": len(manifest["shards"]) if manifest else 0, **verified_figures(verified, problems)}
    if problems:
        return CheckResult("integrity", False, problems_summary(problems), figures, details=problems)
    summary = (
        f"all {len(verified)} shards present and verified on disk: sizes, headers, keys, shapes, dtypes "
        "and digests as recorded"
    )
    return CheckResult("integrity", True, summary, figures)


def verified_figures(verified: Sequence[Mapping[str, Any]], problems: Sequence[str]) -> dict[str, int]:
    """The integrity check's figures of either format: the shards verified, their bytes, the problems found."""
    return {
        "verified_shards": len(verified),
        "verified_bytes": sum(record["bytes"] for record in verified),
        "problems": len(problems),
    }


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
    covered = int(counts[selected].sum())
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


def disk_check(
    cache_dir: Path, manifest: Mapping[str, Any], info: TokenizedInfo, plan: Mapping[str, Any] | None = None
) -> CheckResult:
    """Bytes per sample and per field, padding's share, the size of a larger dataset of the same shape, what
    the same samples would take in the specforge format, and the disk plan's predictions against the
    measured sizes."""
    layout = ShardLayout.from_manifest(manifest)
    n = int(manifest["num_samples"])
    field_bytes = {f.name: f.sample_bytes for f in layout.fields()}
    per_sample = sum(field_bytes.values())
    records = manifest["shards"]
    unexplained = [r["file"] for r in records if layout.shard_bytes(int(r["num_samples"])) != int(r["bytes"])]
    shard_bytes = sum(int(r["bytes"]) for r in records)
    embeddings = cache_dir / EMBEDDINGS_FILE
    embeddings_bytes = embeddings.stat().st_size if embeddings.exists() else 0
    padding_share = 1 - float(info.lengths.sum()) / (n * layout.seq_length)
    shards_allocated = allocated_bytes([cache_dir / r["file"] for r in records])
    specforge_bytes = specforge_files_bytes(info.lengths.tolist(), layout.aux_hidden_dim // 3)
    figures = {
        "num_samples": n,
        "shards": len(records),
        "per_sample_bytes": per_sample,
        "shard_bytes": shard_bytes,
        "embeddings_bytes": embeddings_bytes,
        "total_bytes": shard_bytes + embeddings_bytes,
        "allocated_bytes": shards_allocated + allocated_bytes([embeddings]),
        "padding_share": padding_share,
        "padding_bytes": round(padding_share * n * per_sample),
        **{
            f"projected_{name}_samples_bytes": count * per_sample + embeddings_bytes
            for name, count in PROJECTED_SAMPLES.items()
        },
        # The specforge format keeps no distribution, no padding and no embeddings.
        "specforge_format_bytes": specforge_bytes,
        "specforge_format_of_allocated_shards_share": specforge_bytes / shards_allocated if shards_allocated else 0.0,
    }
    if plan is not None:
        figures.update(planned_figures(plan, figures["total_bytes"], figures["allocated_bytes"]))
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
        f"{format_bytes(per_sample)} per sample, {padding_share:.1%} of positions are padding; "
        f"the specforge format would take {format_bytes(specforge_bytes)}"
    )
    if plan is not None:
        summary += f"; {planned_summary(plan)}"
    return CheckResult("disk", True, summary, figures, series)


def allocated_bytes(paths: Sequence[Path]) -> int:
    """Disk blocks the files take: less than their size where the never-written padding stays a sparse hole.

    A copy that does not keep holes (object storage, `rsync` without `-S`) takes the full size.
    """
    return sum(path.stat().st_blocks * 512 for path in paths if path.exists())


# --- 7. Cost: in `cost` -------------------------------------------------------------------------


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
    "compute_dtype",
    "shard_size",
    "num_samples",
    "target_vocab_size",
    "draft_vocab_size",
    "target_probs_topk",
    "aux_layer_ids",
    "aux_hidden_dim",
    "mask_reasoning_content",
    "mask_generation_prompt",
    "format",
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
    # The store holds the data settings as applied: a JSON file's split and shuffle_seed are None there.
    recorded = {key: manifest.get(key) for key in ("input_data", *ROW_ORDER_SETTINGS)}
    if isinstance(recorded["input_data"], str):
        recorded = applied_settings(recorded)
    for key, value in recorded.items():
        if value != info.source.get(key):
            problems.append(f"{key} is {value!r}, the tokenized store says {info.source.get(key)!r}")
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


# A check, deferred until the report runs it (see `run_check`).
Check = Callable[[], CheckResult]


@dataclass
class CacheReads:
    """One run's inputs and what its checks share, each read once when first needed."""

    inputs: ValidationInputs

    @functools.cached_property
    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.inputs.cache_dir)

    @functools.cached_property
    def info(self) -> TokenizedInfo:
        return read_tokenized_info(self.inputs.tokenized)

    @functools.cached_property
    def stats(self) -> list[dict[str, Any]]:
        # A missing stats file is the cost check's finding, not a reason to stop.
        return read_shard_stats([path for path in self.inputs.stats if path.exists()])

    @functools.cached_property
    def verified(self) -> list[dict[str, Any]]:
        # A missing record is the integrity check's finding.
        return read_shard_stats([path for path in self.inputs.verified if path.exists()])

    @functools.cached_property
    def scan(self) -> ScanSummary:
        """The numeric scans the verification jobs recorded, added up over the shards."""
        return merged_scans([record["scan"] for record in self.verified])

    @functools.cached_property
    def parity(self) -> CheckResult:
        return parity_from_job(self.inputs.parity)


def shared_checks(reads: CacheReads) -> dict[str, Check]:
    """The checks that are the same for every output format."""
    inputs = reads.inputs
    return {
        "parity": lambda: reads.parity,
        "vocabulary": lambda: vocabulary_check(np.load(inputs.counts), reads.manifest, inputs.selection),
        "cost": lambda: cost_check(reads.stats, inputs.benchmarks, len(inputs.stats), reads.verified, reads.parity),
        "provenance": lambda: provenance_check(reads.manifest, reads.info, reads.stats),
    }


def automodel_checks(reads: CacheReads) -> dict[str, Check]:
    """The checks of an Automodel cache's shards."""
    inputs = reads.inputs
    return {
        "integrity": lambda: integrity_check(inputs.cache_dir, reads.verified),
        "sanity": lambda: sanity_check(reads.scan, int(reads.manifest["num_samples"])),
        "supervision": lambda: supervision_check(reads.scan, reads.info),
        "disk": lambda: disk_check(inputs.cache_dir, reads.manifest, reads.info, read_plan(inputs.plan)),
    }


def validate_cache(
    inputs: ValidationInputs, format_checks: Callable[[CacheReads], Mapping[str, Check]] = automodel_checks
) -> ValidationReport:
    """Run every check on one run's cache, from the records the other jobs wrote (no shard is read): the shared
    ones and `format_checks`, in the report's order."""
    reads = CacheReads(inputs)
    checks = {**shared_checks(reads), **format_checks(reads)}
    results = [run_check(key, checks[key]) for key in TITLES if key in checks]
    generated_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return ValidationReport(inputs.run, str(inputs.cache_dir), results, generated_at)


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
