"""Rule script: compute one shard of a run's cache on a leased GPU (or the CPU)."""

import contextlib
import os
from pathlib import Path

import torch

from eagle3_cache.errors import reported_errors
from eagle3_cache.gpu_lease import lease_gpus
from eagle3_cache.logs import logged_wall_split, process_age_seconds, setup_logging
from eagle3_cache.manifest import retire_commit
from eagle3_cache.pipeline import compute_shard, run_shard_job
from eagle3_cache.specforge_shard import compute_specforge_shard
from eagle3_cache.target import resolve_device

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
# The job's fixed cost before its work: the interpreter, Snakemake's preamble and the imports.
start_seconds = process_age_seconds()
log = setup_logging(snakemake.log[0])
# The two shard rules share this script; the run's format decides what it writes.
COMPUTE = {"automodel": compute_shard, "specforge": compute_specforge_shard}
shard_index = int(snakemake.wildcards.shard)
# Read from the config, not params: they change speed and memory only, so changing them reruns nothing.
run = snakemake.config["runs"][snakemake.wildcards.run]
# Snakemake budgets cores by `threads`; on the CPU, torch would otherwise take them all.
torch.set_num_threads(snakemake.threads)

with reported_errors(), logged_wall_split(log):
    retire_commit(Path(snakemake.output.shard).parent, f"shard {shard_index:06d} is being computed")
    with contextlib.ExitStack() as lease:
        gpus = lease.enter_context(lease_gpus(snakemake.config["gpus_per_job"], device=snakemake.config["device"]))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        log.info("shard %06d: GPUs %s (CUDA_VISIBLE_DEVICES=%s)", shard_index, gpus, visible)
        stats = run_shard_job(
            dict(snakemake.params.items()),
            tokenized_path=snakemake.input.tokenized,
            selection_path=snakemake.input.selection,
            shard_index=shard_index,
            batch_size=run["batch_size"],
            tokens_per_forward=run["tokens_per_forward"],
            device=resolve_device(snakemake.config["device"]),
            num_gpus=max(1, len(gpus)),
            shard_path=snakemake.output.shard,
            stats_path=snakemake.output.stats,
            compute=COMPUTE[snakemake.params.format],
            start_seconds=start_seconds,
            leased_gpus=gpus,
            release_gpus=lease.close,
        )

    phases = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in sorted(stats["seconds"].items()))
    forwards = stats["positions_per_forward"]
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
    log.info(
        "shard %06d: %d forwards, %.0f positions each on average, at most %d (budget %d); CUDA peak %s",
        shard_index,
        forwards["forwards"],
        forwards["mean"],
        forwards["max"],
        forwards["budget"],
        ", ".join(
            f"cuda:{gpu['device']} {gpu['peak_allocated_bytes'] / 2**30:.1f} GiB allocated, "
            f"{gpu['peak_reserved_bytes'] / 2**30:.1f} GiB reserved"
            for gpu in stats["cuda_memory"]
        )
        or "n/a",
    )
