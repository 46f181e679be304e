"""Validation of a specforge cache, as the same report: the checks for per-sample files, from the records
the other jobs wrote (no sample file is opened).

- integrity: the directory listing against the manifest (`specforge_cache`), the vocabulary mapping,
  and each shard directory's verification record (`specforge_verification`: sizes, digests, keys,
  shapes, dtypes); a note when a local target directory is one SpecForge's target head would reject;
- numerically sane: no NaN or Inf in either hidden state, tokens and loss masks as tokenized, as the
  verification jobs found them;
- disk: bytes per real token, beside what the Automodel format costs at the same settings, and the disk
  plan's predictions against the measured sizes;
- live parity (`specforge_parity`, its own job), vocabulary, cost and provenance: `validation`'s
  shared checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .cache_dir import CacheProblem, readable_manifest, verification_problems
from .disk_plan import planned_figures, planned_summary, read_plan
from .layout import VOCAB_MAPPING_FILE
from .results import CheckResult, listed, problems_summary
from .scan_summary import ScanSummary
from .shard_layout import ShardLayout
from .specforge_cache import cache_entry_problems, manifest_record_problems, mapping_problems, sample_paths
from .specforge_layout import HIDDEN_KEYS, target_dir_problems
from .specforge_sizes import bytes_per_token
from .token_store import TokenizedInfo
from .units import format_bytes
from .validation import CacheReads, Check, allocated_bytes, verified_figures

# The Automodel fields written at every position of a row, padding included.
FULL_WIDTH_FIELDS = ("input_ids", "attention_mask", "loss_mask")


def specforge_checks(reads: CacheReads) -> dict[str, Check]:
    """The checks of a specforge cache's files, for `validate_cache`."""
    inputs = reads.inputs
    return {
        "integrity": lambda: integrity_check(inputs.cache_dir, reads.verified),
        "sanity": lambda: sanity_check(reads.scan, int(reads.manifest["num_samples"])),
        "disk": lambda: disk_check(inputs.cache_dir, reads.manifest, reads.info, read_plan(inputs.plan)),
    }


# --- Complete and intact -------------------------------------------------------------------------


def directory_problems(cache_dir: Path, manifest: Mapping[str, Any]) -> list[CacheProblem]:
    """The manifest's records, the directory's entries and the vocabulary mapping (no sample file is opened)."""
    return manifest_record_problems(manifest) or (
        cache_entry_problems(cache_dir, manifest) + mapping_problems(cache_dir, manifest)
    )


def integrity_check(cache_dir: Path, verified: Sequence[Mapping[str, Any]]) -> CheckResult:
    """The cache directory against its manifest, and each shard directory's verification record."""
    manifest = readable_manifest(cache_dir)
    if isinstance(manifest, CacheProblem):
        problems, manifest = [str(manifest)], {}
    else:
        problems = [str(p) for p in directory_problems(cache_dir, manifest) + verification_problems(manifest, verified)]
    figures = {
        "shard_directories": len(manifest.get("shards", [])),
        "sample_files": manifest.get("num_files", 0),
        **verified_figures(verified, problems),
    }
    if problems:
        return CheckResult("integrity", False, problems_summary(problems), figures, details=problems)
    summary = (
        f"all {figures['sample_files']} sample files in {figures['shard_directories']} shard directories present "
        "and verified on disk: sizes, digests, keys, shapes and dtypes as recorded; vocabulary mapping as selected"
    )
    return CheckResult("integrity", True, summary, figures, details=target_notes(manifest))


def target_notes(manifest: Mapping[str, Any]) -> list[str]:
    """For a local target directory, what SpecForge's TargetHead will reject in it. A note, not a failure:
    the cache is sound, and the directory can be fixed (`write_weight_index`) without recomputing it."""
    target = Path(manifest["target_model"])
    if not target.is_dir():
        return []
    problems = target_dir_problems(target, manifest["lm_head_key"])
    return [f"SpecForge cannot train from this target yet: {problem}" for problem in problems]


# --- Numerically sane ----------------------------------------------------------------------------


def sanity_check(scan: ScanSummary, num_samples: int) -> CheckResult:
    """No NaN or Inf in either hidden state of any file; each file's tokens and loss mask as tokenized."""
    figures = {
        "files_scanned": scan.samples,
        **{f"nonfinite_{key}_values": sum(f.count for f in scan.findings if f.field == key) for key in HIDDEN_KEYS},
        "samples_unlike_tokenized": len(scan.samples_unlike_tokenized),
    }
    problems = [str(finding) for finding in scan.findings if finding.kind == "nonfinite"]
    if scan.samples_unlike_tokenized:
        problems.append(
            f"{len(scan.samples_unlike_tokenized)} samples whose input_ids or loss_mask differ from tokenized.h5: "
            f"{listed(scan.samples_unlike_tokenized)}"
        )
    if scan.samples != num_samples:
        problems.append(f"the verified shards hold {scan.samples} readable files, the manifest has {num_samples}")
    if problems:
        return CheckResult("sanity", False, problems_summary(problems), figures, details=problems)
    return CheckResult("sanity", True, f"all {num_samples} files finite; tokens and loss masks as tokenized", figures)


# --- Disk ----------------------------------------------------------------------------------------


def automodel_written_bytes(layout: ShardLayout, lengths: Sequence[int]) -> int:
    """The bytes the Automodel format writes for samples of these lengths: every position of the full-width
    fields, the content positions of the computed ones (the rest stay sparse holes)."""
    full_width = [f.sample_bytes for f in layout.fields() if f.name in FULL_WIDTH_FIELDS]
    per_position = [f.sample_bytes // layout.seq_length for f in layout.fields() if f.name not in FULL_WIDTH_FIELDS]
    return len(lengths) * sum(full_width) + sum(lengths) * sum(per_position)


def disk_check(
    cache_dir: Path, manifest: Mapping[str, Any], info: TokenizedInfo, plan: Mapping[str, Any] | None = None
) -> CheckResult:
    """Bytes per real token, split by field, beside what the Automodel format takes at the same settings, and
    the disk plan's predictions against the measured sizes."""
    hidden = int(manifest["hidden_size"])
    paths = [path for path, _ in sample_paths(cache_dir, manifest)]
    file_bytes = sum(int(s["bytes"]) for s in manifest["shards"])
    real_tokens = int(info.lengths.sum())
    layout = ShardLayout(int(manifest["seq_length"]), 3 * hidden, int(manifest["draft_vocab_size"]), "bf16", 0)
    automodel_bytes = len(paths) * sum(f.sample_bytes for f in layout.fields())
    automodel_written = automodel_written_bytes(layout, info.lengths.tolist())
    allocated = allocated_bytes(paths)
    per_token = bytes_per_token(hidden)
    container = file_bytes - real_tokens * sum(per_token.values())
    mapping = cache_dir / VOCAB_MAPPING_FILE
    figures = {
        "num_samples": len(paths),
        "real_tokens": real_tokens,
        "per_sample_bytes": file_bytes / len(paths),
        "file_bytes": file_bytes,
        "total_bytes": file_bytes + (mapping.stat().st_size if mapping.exists() else 0),
        "allocated_bytes": allocated,
        "bytes_per_real_token": file_bytes / real_tokens,
        "allocated_bytes_per_real_token": allocated / real_tokens,
        "container_bytes_per_file": container / len(paths),
        "automodel_format_bytes": automodel_bytes,
        "automodel_format_written_bytes": automodel_written,
        "automodel_format_written_bytes_per_real_token": automodel_written / real_tokens,
        "of_the_automodel_format_written_share": allocated / automodel_written,
    }
    if plan is not None:
        figures.update(planned_figures(plan, figures["total_bytes"], allocated + allocated_bytes([mapping])))
    rows = [{"field": key, "per_sample_bytes": size * real_tokens / len(paths)} for key, size in per_token.items()]
    rows.append({"field": "zip container", "per_sample_bytes": container / len(paths)})
    summary = (
        f"{format_bytes(file_bytes)} in {len(paths)} files ({format_bytes(allocated)} allocated), "
        f"{figures['allocated_bytes_per_real_token']:,.0f} B per real token allocated: "
        f"{figures['of_the_automodel_format_written_share']:.0%} of the Automodel format's "
        f"{figures['automodel_format_written_bytes_per_real_token']:,.0f} B at these settings"
    )
    if plan is not None:
        summary += f"; {planned_summary(plan)}"
    return CheckResult("disk", True, summary, figures, {"fields": rows})
