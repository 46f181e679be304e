"""The live parity job (rule `parity`): a few stored samples recomputed by the live target and compared with the cache.

It is the only validation step that runs the target, so the only one that holds GPUs, and only
while it runs. Its result, with the GPU seconds it held, goes to `parity.json` for the report.
The comparison itself is the `parity` rule, shared with the benchmark; `specforge_parity` compares
the specforge format's files.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cache_rows import CacheSpec, compute_cache_batch
from .gpu_lease import lease_gpus
from .layout import shard_file_name
from .manifest import read_shard_stats
from .parity import parity_outcome, parity_result, parity_sample_indices
from .results import CheckResult
from .shard_format import DTYPES, read_shard_rows
from .target import load_target, resolve_device
from .token_store import read_token_rows, read_tokenized_info
from .validation import run_check
from .vocab_selection import read_vocab_selection


@dataclass(frozen=True)
class ParityInputs:
    """The files of one run the live parity check reads, and its settings."""

    cache_dir: Path
    tokenized: Path
    selection: Path
    stats: Sequence[Path]
    settings: Mapping[str, Any]  # the parity rule's run settings (layout.PARITY_SETTINGS)
    num_samples: int  # samples to recompute
    seed: int

    def samples(self) -> list[int]:
        """The samples to recompute, spread over the shards."""
        total = read_tokenized_info(self.tokenized).num_samples
        return parity_sample_indices(total, self.settings["shard_size"], self.num_samples, self.seed)


def parity_spec(inputs: ParityInputs, stats: Sequence[Mapping[str, Any]]) -> CacheSpec:
    """The CacheSpec the shards were computed under: the settings, the draft vocabulary and the stats' aux layers."""
    selected, target_vocab_size = read_vocab_selection(inputs.selection)
    return CacheSpec(
        aux_layer_ids=list(stats[0]["aux_layer_ids"]),
        selected_token_ids=torch.from_numpy(selected),
        target_vocab_size=target_vocab_size,
        dtype=inputs.settings["dtype"],
        target_probs_topk=int(inputs.settings["target_probs_topk"] or 0),
    )


def shard_compute_dtypes(stats: Sequence[Mapping[str, Any]]) -> set[torch.dtype]:
    """The dtypes the shard jobs computed in, as each one recorded."""
    return {getattr(torch, s["compute_dtype"]) for s in stats}


def stored_sample(cache_dir: Path, shard_size: int, sample: int) -> dict[str, torch.Tensor]:
    """One sample's stored fields, read from its shard."""
    shard, row = divmod(sample, shard_size)
    return {name: values[0] for name, values in read_shard_rows(cache_dir / shard_file_name(shard), [row]).items()}


def recomputed_samples(
    model: nn.Module, spec: CacheSpec, inputs: ParityInputs, samples: list[int]
) -> Iterator[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Each of `samples` run through the target by the shards' own function, beside its stored rows.

    One sample per forward: the target runs on no padding, and each row is recomputed in another
    batch than the shard job's, as a row's content must not depend on its batch.
    """
    shard_size = inputs.settings["shard_size"]
    for sample in samples:
        live = compute_cache_batch(model, spec, read_token_rows(inputs.tokenized, [sample])).cpu().padded()
        live_sample = {name: values[0] for name, values in live.items()}
        yield sample, live_sample, stored_sample(inputs.cache_dir, shard_size, sample)


def compared_samples(model: nn.Module, inputs: ParityInputs, samples: list[int], load_seconds: float) -> CheckResult:
    """The parity rule's verdict on `samples`, recomputed by the loaded target."""
    stats = read_shard_stats(inputs.stats)
    spec = parity_spec(inputs, stats)
    outcome = parity_outcome(
        recomputed_samples(model, spec, inputs, samples),
        shard_size=inputs.settings["shard_size"],
        draft_vocab_size=spec.draft_vocab_size,
        cache_dtype=DTYPES[inputs.settings["dtype"]],
        compute_dtypes=shard_compute_dtypes(stats) | {next(model.parameters()).dtype},
    )
    return parity_result(outcome, load_seconds)


# Recomputes the samples with the loaded target and compares them with one output format's files.
Comparison = Callable[[nn.Module, ParityInputs, list[int], float], CheckResult]


NOT_RUN = CheckResult("parity", True, "not run: validation.num_samples is 0", {"samples_checked": 0})


def checked_parity(model: nn.Module, inputs: ParityInputs, compare: Comparison, load_seconds: float) -> CheckResult:
    """The parity check with the loaded target: `compare` on the samples, or not run when there are none."""
    samples = inputs.samples()
    if not samples:
        return NOT_RUN
    return run_check("parity", lambda: compare(model, inputs, samples, load_seconds))


def run_parity_job(
    inputs: ParityInputs, *, device: str, gpus_per_job: int, compare: Comparison = compared_samples
) -> CheckResult:
    """What the parity job does: lease GPUs (none on the CPU), load the target, `compare`, record the GPU seconds."""
    if not inputs.samples():
        return NOT_RUN
    settings = inputs.settings
    with lease_gpus(gpus_per_job, device=device) as gpus:
        started = time.perf_counter()
        model = load_target(
            settings["target_model"],
            revision=settings["revision"],
            trust_remote_code=settings["trust_remote_code"],
            device=resolve_device(device),
            dtype=settings["compute_dtype"],
            num_gpus=max(1, len(gpus)),
        )
        result = checked_parity(model, inputs, compare, time.perf_counter() - started)
        held = time.perf_counter() - started
    figures = {**result.figures, "gpus": len(gpus), "job_seconds": held, "gpu_seconds": held * len(gpus)}
    return replace(result, figures=figures)
