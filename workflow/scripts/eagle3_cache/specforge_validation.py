"""Validation of a specforge cache, as the same report: the checks for per-sample files.

- integrity: every file against the manifest (`check_specforge_cache`: sizes, sha256, keys, shapes,
  dtypes; the vocabulary mapping), and a note when a local target directory is one SpecForge's
  target head would reject;
- live parity: stored hidden states against a fresh forward through `compute_cache_batch`, and
  lm_head(hidden_state) against the target's own logits;
- numerically sane: no NaN or Inf in either hidden state; tokens and loss masks as tokenized;
- disk: bytes per real token, beside what the Automodel format costs at the same settings, and the disk
  plan's predictions against the measured sizes;
- vocabulary, cost and provenance: `validation`'s shared checks, which read nothing format-specific.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cache_rows import CacheSpec, compute_cache_batch
from .disk_plan import planned_figures, planned_summary, read_plan
from .layout import MANIFEST_FILE, VOCAB_MAPPING_FILE, samples_in_shard
from .parity import TOLERANCE_RULE, FieldErrors, parity_eps, parity_sample_indices, tolerance_problems, tolerance_row
from .report_html import format_bytes
from .results import CheckResult, listed, problems_summary
from .shard_format import ShardLayout, read_manifest
from .specforge_cache import check_specforge_cache, sample_paths
from .specforge_format import (
    HIDDEN_KEYS,
    TARGET_REPR,
    nonfinite_values,
    read_sample_file,
    target_dir_problems,
)
from .specforge_sizes import bytes_per_token
from .token_store import TokenBlock, TokenizedInfo, read_token_block, read_token_rows
from .validation import CacheReads, Check, allocated_bytes, cache_spec, shard_compute_dtypes

# Positions whose full-vocabulary logits are compared at once ([block, V] fp32).
LOGIT_POSITION_BLOCK = 128
# The Automodel fields written at every position of a row, padding included.
FULL_WIDTH_FIELDS = ("input_ids", "attention_mask", "loss_mask")
# What each stored hidden state is compared with in a fresh `compute_cache_batch`.
RECOMPUTED = {"hidden_state": "final_hidden_state", "aux_hidden_state": "aux_hidden_states"}


def specforge_checks(reads: CacheReads) -> dict[str, Check]:
    """The checks of a specforge cache's files, for `validate_cache`."""
    inputs = reads.inputs
    return {
        "integrity": lambda: integrity_check(inputs.cache_dir),
        "parity": lambda: parity_check(reads),
        "sanity": lambda: sanity_check(inputs.cache_dir, reads.manifest, inputs.tokenized),
        "disk": lambda: disk_check(inputs.cache_dir, reads.manifest, reads.info, read_plan(inputs.plan)),
    }


# --- Complete and intact -------------------------------------------------------------------------


def integrity_check(cache_dir: Path) -> CheckResult:
    """The cache directory against its manifest, every file hashed and opened."""
    problems = [str(problem) for problem in check_specforge_cache(cache_dir)]
    manifest = read_manifest(cache_dir) if (cache_dir / MANIFEST_FILE).exists() else {}
    figures = {
        "shard_directories": len(manifest.get("shards", [])),
        "sample_files": manifest.get("num_files", 0),
        "verified_bytes": sum(int(s["bytes"]) for s in manifest.get("shards", [])),
        "problems": len(problems),
    }
    if problems:
        return CheckResult("integrity", False, problems_summary(problems), figures, details=problems)
    summary = (
        f"all {figures['sample_files']} sample files in {figures['shard_directories']} shard directories present; "
        "sizes, sha256, keys, shapes and dtypes as recorded; vocabulary mapping as selected"
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


# --- Live parity ---------------------------------------------------------------------------------


def sample_path(cache_dir: Path, manifest: Mapping[str, Any], sample: int) -> Path:
    """Where the manifest puts one sample's file."""
    shard, row = divmod(sample, int(manifest["shard_size"]))
    record = manifest["shards"][shard]
    return cache_dir / record["directory"] / record["files"][row]["file"]


@torch.no_grad()
def compare_with_live_target(
    model: nn.Module, spec: CacheSpec, stored: Mapping[str, torch.Tensor], tokens: TokenBlock, eps: float
) -> dict[str, FieldErrors]:
    """One sample's stored hidden states against a fresh forward, and lm_head of its stored hidden state
    against the target's own logits (what SpecForge's TargetHead must reproduce)."""
    length = int(tokens.attention_mask.sum())
    live = compute_cache_batch(model, spec, tokens).cpu().computed
    positions = torch.arange(length)
    errors = {key: FieldErrors() for key in (*RECOMPUTED, "logits")}
    for key, name in RECOMPUTED.items():
        errors[key].add_block(live[name][0, :length], stored[key][0], positions, eps)
    device = model.get_input_embeddings().weight.device
    head = model.get_output_embeddings()
    logits = model(input_ids=tokens.input_ids[:, :length].to(device), use_cache=False).logits[0]
    for start in range(0, length, LOGIT_POSITION_BLOCK):
        block = positions[start : start + LOGIT_POSITION_BLOCK]
        ours = head(stored["hidden_state"][0, block].to(device=device, dtype=head.weight.dtype))
        errors["logits"].add_block(ours.cpu(), logits[block].cpu(), block, eps)
    return errors


def parity_check(reads: CacheReads) -> CheckResult:
    """Recompute `validation.num_samples` samples with the live target and compare them with their files."""
    inputs, manifest = reads.inputs, reads.manifest
    samples = parity_sample_indices(
        int(manifest["num_samples"]), int(manifest["shard_size"]), inputs.num_samples, inputs.seed
    )
    if not samples:
        return CheckResult("parity", True, "not run: validation.num_samples is 0", {"samples_checked": 0})
    spec = dataclasses.replace(cache_spec(manifest), target_repr=TARGET_REPR)
    started = time.perf_counter()
    with reads.open_target() as model:
        load_seconds = time.perf_counter() - started
        eps = parity_eps(spec.cache_dtype, shard_compute_dtypes(reads.stats) | {next(model.parameters()).dtype})
        tokens = read_token_rows(inputs.tokenized, samples)
        compared = {
            sample: compare_with_live_target(
                model,
                spec,
                read_sample_file(sample_path(inputs.cache_dir, manifest, sample)),
                TokenBlock(tokens.input_ids[i : i + 1], tokens.attention_mask[i : i + 1], tokens.loss_mask[i : i + 1]),
                eps,
            )
            for i, sample in enumerate(samples)
        }
    return parity_result(compared, eps, load_seconds)


def parity_result(compared: Mapping[int, Mapping[str, FieldErrors]], eps: float, load_seconds: float) -> CheckResult:
    """Per field, the largest errors over every sample checked; a problem per sample and field beyond tolerance."""
    keys = next(iter(compared.values())).keys()
    fields = [tolerance_row(key, [errors[key] for errors in compared.values()]) for key in keys]
    problems = [
        line for sample, errors in compared.items() for line in tolerance_problems(f"sample {sample}", errors, eps)
    ]
    figures = {
        "samples_checked": len(compared),
        "eps": eps,
        "tolerance": TOLERANCE_RULE,
        "model_load_seconds": load_seconds,
    }
    series = {"fields": fields, "samples": [{"sample": sample} for sample in compared]}
    if problems:
        return CheckResult("parity", False, problems_summary(problems), figures, series, problems)
    summary = (
        f"{len(compared)} samples ({', '.join(map(str, compared))}): stored hidden states match a fresh forward, "
        "and lm_head(hidden_state) gives the target's own logits"
    )
    return CheckResult("parity", True, summary, figures, series)


# --- Numerically sane ----------------------------------------------------------------------------


def sanity_check(cache_dir: Path, manifest: Mapping[str, Any], tokenized: Path) -> CheckResult:
    """No NaN or Inf in either hidden state of any file; each file's tokens and loss mask as tokenized."""
    nonfinite = {key: 0 for key in HIDDEN_KEYS}
    with_nonfinite, unlike_tokenized = [], []
    n, size = int(manifest["num_samples"]), int(manifest["shard_size"])
    paths = sample_paths(cache_dir, manifest)
    for shard in range(len(manifest["shards"])):
        tokens = read_token_block(tokenized, shard * size, shard * size + samples_in_shard(shard, n, size))
        for row in range(tokens.input_ids.shape[0]):
            path, _ = next(paths)
            sample = read_sample_file(path)
            counts = nonfinite_values(sample)
            if any(counts.values()):
                with_nonfinite.append(shard * size + row)
            nonfinite = {key: nonfinite[key] + counts[key] for key in HIDDEN_KEYS}
            length = int(tokens.attention_mask[row].sum())
            same = sample["input_ids"].shape == (length,) and torch.equal(
                sample["input_ids"], tokens.input_ids[row, :length]
            )
            if not (same and torch.equal(sample["loss_mask"], tokens.loss_mask[row, :length])):
                unlike_tokenized.append(shard * size + row)
    figures = {
        "files_scanned": n,
        **{f"nonfinite_{key}_values": count for key, count in nonfinite.items()},
        "samples_unlike_tokenized": len(unlike_tokenized),
    }
    problems = []
    if with_nonfinite:
        problems.append(f"NaN or Inf in the hidden states of {len(with_nonfinite)} samples: {listed(with_nonfinite)}")
    if unlike_tokenized:
        problems.append(
            f"{len(unlike_tokenized)} samples whose input_ids or loss_mask differ from tokenized.h5: "
            f"{listed(unlike_tokenized)}"
        )
    if problems:
        return CheckResult("sanity", False, problems_summary(problems), figures, details=problems)
    return CheckResult("sanity", True, f"all {n} files finite; tokens and loss masks as tokenized", figures)


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
