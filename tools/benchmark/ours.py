"""Our side, in a child process: tokenize and select the vocabulary as the rules do, then compute shards."""

from __future__ import annotations

from pathlib import Path

import torch

from eagle3_cache.layout import num_shards, shard_file_name
from eagle3_cache.shard_layout import ShardLayout

from .measure import current_rss_mib, stopwatch, timed
from .workload import SHUFFLE_SEED, Workload

# Fields our writer stores for every position; the computed ones only on content positions.
FULL_WIDTH_FIELDS = ("input_ids", "attention_mask", "loss_mask")


def prepare_ours(job: dict) -> dict:
    """Tokenize and select the draft vocabulary as the workflow's tokenize and select_vocab rules do, timed."""
    from eagle3_cache.tokenization import tokenize_dataset
    from eagle3_cache.vocab import build_vocab_selection

    workload = Workload(**job["workload"])
    _, tokenize_seconds = timed(
        lambda: tokenize_dataset(
            job["tokenized"],
            target_model=workload.model,
            revision=None,
            trust_remote_code=False,
            input_data=workload.conversations,
            split=None,
            shuffle_seed=SHUFFLE_SEED,
            seq_length=workload.seq_length,
            mask_reasoning_content=False,
            mask_generation_prompt=False,
        )
    )
    _, vocab_seconds = timed(
        lambda: build_vocab_selection(job["tokenized"], workload.draft_vocab_size, job["selection"])
    )
    return {"tokenize_seconds": tokenize_seconds, "vocab_seconds": vocab_seconds}


def run_ours(job: dict) -> dict:
    """Our shard jobs as `run_shard_job` runs them once the model is loaded; loaded once for all shards."""
    # Imported before the load is timed, as for the reference.
    from transformers import AutoModelForCausalLM  # noqa: F401

    from eagle3_cache.target import load_target, resolve_device

    workload = Workload(**job["workload"])
    device = resolve_device(workload.device)
    model, load_seconds = timed(
        lambda: load_target(
            workload.model, revision=None, trust_remote_code=False, device=device, dtype=workload.compute_dtype
        )
    )
    return {**compute_our_shards(model, workload, job), "load_seconds": load_seconds}


def compute_our_shards(model: torch.nn.Module, workload: Workload, job: dict) -> dict:
    """Every shard (or those in job["shards"]) through `compute_shard`, set up as `run_shard_job` does."""
    from eagle3_cache.pipeline import ShardJob, compute_shard, shard_spec_and_layout
    from eagle3_cache.token_store import read_tokenized_info

    loaded_rss = current_rss_mib()
    info = read_tokenized_info(job["tokenized"])
    spec, layout = shard_spec_and_layout(
        model,
        job["selection"],
        aux_layer_ids=None,
        dtype=workload.dtype,
        target_probs_topk=0,
        seq_length=workload.seq_length,
    )
    shards = job.get("shards") or range(num_shards(info.num_samples, workload.shard_size))
    output = Path(job["output"])
    output.mkdir(parents=True, exist_ok=True)
    with stopwatch() as elapsed:
        results = [
            compute_shard(
                model,
                spec,
                layout,
                ShardJob(
                    tokenized_path=job["tokenized"],
                    num_samples=info.num_samples,
                    shard_index=index,
                    shard_size=workload.shard_size,
                    batch_size=workload.batch_size,
                    shard_path=output / shard_file_name(index),
                    tokens_per_forward=job.get("tokens_per_forward"),
                ),
            )
            for index in shards
        ]
    samples, real_tokens = sum(r.num_samples for r in results), sum(r.real_tokens for r in results)
    phases: dict[str, float] = {}
    for result in results:
        for phase, phase_seconds in result.seconds.items():
            phases[phase] = phases.get(phase, 0.0) + phase_seconds
    return {
        "samples": samples,
        "real_tokens": real_tokens,
        "computed_tokens": sum(r.computed_tokens for r in results),
        "bytes": sum(r.bytes for r in results),
        "content_bytes": content_bytes(layout, samples, real_tokens),
        "seconds": elapsed.wall,
        "cpu_seconds": elapsed.cpu,
        "phases": phases,
        "loaded_rss_mib": loaded_rss,
    }


def content_bytes(layout: ShardLayout, samples: int, real_tokens: int) -> int:
    """Bytes our writer actually writes: full-width fields whole, computed fields on content positions."""
    total = 0
    for field in layout.fields():
        per_position = field.sample_bytes // layout.seq_length
        positions = samples * layout.seq_length if field.name in FULL_WIDTH_FIELDS else real_tokens
        total += per_position * positions
    return total
