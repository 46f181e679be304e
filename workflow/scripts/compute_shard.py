"""Rule script: compute one shard of a run's cache on a leased GPU (or the CPU)."""

import os
from pathlib import Path

import torch

from eagle3_cache.gpu_lease import lease_gpus
from eagle3_cache.logs import setup_logging
from eagle3_cache.manifest import retire_commit
from eagle3_cache.pipeline import run_shard_job
from eagle3_cache.target import resolve_device

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
shard_index = int(snakemake.wildcards.shard)
# Snakemake budgets cores by `threads`; on the CPU, torch would otherwise take them all.
torch.set_num_threads(snakemake.threads)
retire_commit(Path(snakemake.output.shard).parent, f"shard {shard_index:06d} is being computed")

with lease_gpus(snakemake.config["gpus_per_job"], device=snakemake.config["device"]) as gpus:
    log.info("shard %06d: GPUs %s (CUDA_VISIBLE_DEVICES=%s)", shard_index, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    stats = run_shard_job(
        dict(snakemake.params.items()),
        tokenized_path=snakemake.input.tokenized,
        selection_path=snakemake.input.selection,
        shard_index=shard_index,
        batch_size=snakemake.config["runs"][snakemake.wildcards.run]["batch_size"],
        device=resolve_device(snakemake.config["device"]),
        num_gpus=max(1, len(gpus)),
        shard_path=snakemake.output.shard,
        stats_path=snakemake.output.stats,
    )

phases = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in sorted(stats["seconds"].items()))
log.info(
    "shard %06d: %d samples, %d real tokens (%d computed, %d padded), %.1f MB; %s",
    shard_index,
    stats["num_samples"],
    stats["real_tokens"],
    stats["computed_tokens"],
    stats["padded_tokens"],
    stats["bytes"] / 1e6,
    phases,
)
