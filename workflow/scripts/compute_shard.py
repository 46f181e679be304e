"""Rule script: compute one shard of a run's cache on a leased GPU (or the CPU)."""

import os
import socket
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from eagle3_cache.atomic import write_json_atomic
from eagle3_cache.gpu_lease import lease_gpus
from eagle3_cache.logs import setup_logging
from eagle3_cache.pipeline import compute_shard
from eagle3_cache.provenance import ids_fingerprint, settings_fingerprint
from eagle3_cache.shard_format import ShardLayout
from eagle3_cache.target import (
    CacheSpec,
    hidden_size,
    load_target,
    model_identity,
    resolve_aux_layer_ids,
    resolve_device,
)
from eagle3_cache.tokenized import read_tokenized_info
from eagle3_cache.vocab import read_vocab_selection

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
params = snakemake.params
run_config = snakemake.config["runs"][snakemake.wildcards.run]
shard_index = int(snakemake.wildcards.shard)
gpus_wanted = 0 if snakemake.config["device"] == "cpu" else snakemake.config["gpus_per_job"]
lock_dir = Path(tempfile.gettempdir()) / "eagle3-cache-gpu-locks"

with lease_gpus(gpus_wanted, lock_dir) as gpus:
    log.info("shard %06d: GPUs %s (CUDA_VISIBLE_DEVICES=%s)", shard_index, gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    device = resolve_device(snakemake.config["device"])
    started = time.perf_counter()
    model = load_target(
        params.target_model,
        revision=params.revision,
        trust_remote_code=params.trust_remote_code,
        device=device,
        num_gpus=max(1, len(gpus)),
    )
    load_seconds = time.perf_counter() - started
    log.info("loaded %s on %s in %.1fs", params.target_model, device, load_seconds)

    info = read_tokenized_info(snakemake.input.tokenized)
    selected, target_vocab_size = read_vocab_selection(snakemake.input.selection)
    aux_layer_ids = resolve_aux_layer_ids(model, params.aux_layer_ids)
    spec = CacheSpec(aux_layer_ids, selected, target_vocab_size, params.dtype, params.target_probs_topk)
    layout = ShardLayout(params.seq_length, 3 * hidden_size(model), spec.draft_vocab_size, params.dtype, params.target_probs_topk)
    result = compute_shard(
        model,
        spec,
        layout,
        tokenized_path=snakemake.input.tokenized,
        num_samples=info.num_samples,
        shard_index=shard_index,
        shard_size=params.shard_size,
        batch_size=run_config["batch_size"],
        shard_path=snakemake.output.shard,
    )
    result.seconds["load"] = load_seconds
    result.seconds["total"] = time.perf_counter() - started
    stats = {
        **asdict(result),
        "shard": shard_index,
        "aux_layer_ids": aux_layer_ids,
        "aux_hidden_dim": layout.aux_hidden_dim,
        "target_vocab_size": target_vocab_size,
        "selected_token_ids_sha256": ids_fingerprint(selected.tolist()),
        "settings_fingerprint": settings_fingerprint(dict(params.items())),
        "model_identity": model_identity(params.target_model, params.revision, model),
        "device": str(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(),
        "batch_size": run_config["batch_size"],
    }
    write_json_atomic(snakemake.output.stats, stats)
    phases = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in sorted(result.seconds.items()))
    log.info(
        "shard %06d: %d samples, %d real tokens (%d computed, %d padded), %.1f MB; %s",
        shard_index,
        result.num_samples,
        result.real_tokens,
        result.computed_tokens,
        result.padded_tokens,
        result.bytes / 1e6,
        phases,
    )
