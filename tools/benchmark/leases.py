"""Shard jobs leasing GPUs as the workflow's do (`eagle3_cache.gpu_lease`): one per child process, and the verdict."""

from __future__ import annotations

import os
import time

import torch

from eagle3_cache.gpu_lease import checked_cuda_devices, lease_gpus

from .ours import run_ours

# How often a waiting job retries the locks (the workflow's jobs wait 5 s between tries).
LEASE_POLL_S = 0.2


def run_leased(job: dict) -> dict:
    """Lease one GPU (before anything initialises CUDA), then compute the job's shards on it; when, and which."""
    requested_at = time.time()
    with lease_gpus(1, job["lock_dir"], candidates=job["candidates"], poll_s=LEASE_POLL_S) as gpus:
        leased_at = time.time()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        result = run_ours(job)
        # Which physical GPUs CUDA gave it, held to the lease (a job's own check: gpu_lease).
        uuids = checked_cuda_devices(gpus) if torch.cuda.is_initialized() else []
        # Read inside the lease: once it ends another job may take the GPU at once.
        done_at = time.time()
    return {
        **result,
        "gpus": gpus,
        "gpu_uuids": uuids,
        "cuda_visible_devices": visible,
        "requested_at": requested_at,
        "leased_at": leased_at,
        "done_at": done_at,
    }


def lease_verdict(jobs: list[dict], gpu_count: int) -> dict:
    """Whether concurrent jobs got distinct GPUs and ran side by side, or, with one GPU, waited in turn."""
    first, second = sorted(jobs, key=lambda job: job["leased_at"])
    waited = second["leased_at"] - second["requested_at"]
    if gpu_count >= 2:
        distinct = first["gpus"] != second["gpus"] and first["gpu_uuids"] != second["gpu_uuids"]
        passed = distinct and second["leased_at"] < first["done_at"]
        summary = (
            f"two jobs ran side by side on GPUs {first['gpus']} and {second['gpus']} "
            f"({', '.join(first['gpu_uuids'] + second['gpu_uuids'])})"
            if passed
            else f"no distinct GPUs at once: {first['gpus']}, then {second['gpus']} after {waited:.1f}s"
        )
    else:
        passed = first["gpus"] == second["gpus"] and second["leased_at"] >= first["done_at"]
        summary = (
            f"one GPU ({first['gpus']}): the second job waited {waited:.1f}s, until the first's lease ended"
            if passed
            else f"one GPU, but the second job's lease ({second['gpus']}) began before the first's ended"
        )
    return {"passed": passed, "summary": summary, "gpu_count": gpu_count, "second_waited_seconds": waited}
