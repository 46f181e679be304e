"""Give each concurrent job GPUs of its own.

`snakemake --resources gpu=N` caps how many GPUs the running jobs hold in total, but
never tells a job which GPUs are its own. A job leases distinct ids here: one lock
file per GPU id, held with `flock`, which the kernel releases when the holder exits
in any way (SIGKILL included), so a crashed job never strands a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import torch

from .errors import CacheConfigError

log = logging.getLogger(__name__)

NVML_LIBRARY = "libnvidia-ml.so.1"
NVIDIA_PROC_GPUS = Path("/proc/driver/nvidia/gpus")
ROCM_DEVICE = Path("/dev/kfd")
# Without `--resources gpu=N` more jobs start than there are GPUs and the extra ones
# queue here, possibly for several shards' time; the timeout only catches a wait
# that can never end.
DEFAULT_TIMEOUT_S = 6 * 3600.0


def default_lock_dir() -> Path:
    """Per-user folder for the lock files, shared by every workflow on this machine. Inside a SLURM job, one
    per job: the jobs run inside one allocation share its GPUs, while another job's ids, which SLURM may
    number from 0 on the same node, name other GPUs."""
    job = os.environ.get("SLURM_JOB_ID")
    return Path(tempfile.gettempdir()) / f"eagle3-cache-gpu-locks-{os.getuid()}{f'-slurm-{job}' if job else ''}"


def visible_gpu_ids() -> list[str]:
    """The GPU ids this process may use: CUDA_VISIBLE_DEVICES, else all GPUs present."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [gpu.strip() for gpu in visible.split(",") if gpu.strip()]
    return [str(index) for index in range(present_gpu_count())]


def present_gpu_count() -> int:
    """The NVIDIA GPUs of this machine, counted without initialising CUDA (CUDA_VISIBLE_DEVICES set after
    CUDA starts is ignored): NVML, else the driver's entries under /proc; torch's count on ROCm."""
    count = nvml_gpu_count()
    if count is not None:
        return count
    if NVIDIA_PROC_GPUS.is_dir():
        return sum(1 for _ in NVIDIA_PROC_GPUS.iterdir())
    if ROCM_DEVICE.exists():
        return torch.cuda.device_count()
    return 0


def nvml_gpu_count() -> int | None:
    """The GPU count NVML reports, or None when NVML is missing or fails."""
    try:
        nvml = ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint(0)
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else None
    finally:
        nvml.nvmlShutdown()


def slurm_assigned_gpus() -> list[str] | None:
    """The GPUs SLURM gave this job, or None outside a SLURM job with GPUs."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    assigned = os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("SLURM_JOB_GPUS")
    if not assigned:
        return None
    return [gpu.strip() for gpu in assigned.split(",") if gpu.strip()]


def lock_path(lock_dir: Path, gpu: str) -> Path:
    """The lock file of one GPU id (ids can be UUIDs, so keep them file-name safe)."""
    return lock_dir / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def try_lock(path: Path) -> IO[str] | None:
    """The open, exclusively locked file at `path`, or None when another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def try_lease(count: int, candidates: Sequence[str], lock_dir: Path, stack: contextlib.ExitStack) -> list[str] | None:
    """`count` free ids locked on `stack`, or None (holding nothing) when too few are free.

    All or nothing, so two multi-GPU jobs can never each hold part of what the
    other waits for.
    """
    attempt = contextlib.ExitStack()
    leased = []
    for gpu in candidates:
        handle = try_lock(lock_path(lock_dir, gpu))
        if handle is not None:
            attempt.enter_context(handle)
            leased.append(gpu)
            if len(leased) == count:
                stack.enter_context(attempt.pop_all())
                return leased
    attempt.close()
    return None


@contextlib.contextmanager
def scoped_visible_devices(gpus: Sequence[str]) -> Iterator[None]:
    """Set CUDA_VISIBLE_DEVICES to `gpus`, numbered as nvidia-smi and NVML number them (PCI bus order, not
    CUDA's default fastest-first), restoring both variables on exit."""
    settings = {"CUDA_VISIBLE_DEVICES": ",".join(gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


@contextlib.contextmanager
def lease_gpus(
    count: int,
    lock_dir: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    candidates: Sequence[str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    poll_s: float = 5.0,
) -> Iterator[list[str]]:
    """Lease `count` GPUs for the duration of the block and yield their ids.

    Call it before anything initialises CUDA: it points CUDA_VISIBLE_DEVICES at the
    leased ids, so the job sees them as cuda:0.. . Yields [] (no lease) when
    `device` is "cpu", `count` is 0 or no GPU is present. Inside a SLURM job with
    GPUs, leases among the scheduler's assignment, which the jobs of one allocation
    (a local run under `salloc`) share; with only SLURM_JOB_GPUS to go by, yields
    it untouched. When every candidate is leased it waits, and raises
    CacheConfigError after `timeout_s`.
    """
    if device == "cpu" or count == 0:
        yield []
        return
    assigned = slurm_assigned_gpus()
    if assigned is not None:
        if len(assigned) < count:
            raise CacheConfigError(
                f"SLURM gave this job {len(assigned)} GPU(s) ({','.join(assigned)}) but "
                f"gpus_per_job is {count}: remove the gpu override for this rule from "
                "the SLURM profile, or lower gpus_per_job in the config."
            )
        if "CUDA_VISIBLE_DEVICES" not in os.environ:
            # SLURM_JOB_GPUS holds the node's indices, which may not be how this process numbers its GPUs.
            yield assigned
            return
        candidates = assigned
    candidates = list(candidates) if candidates is not None else visible_gpu_ids()
    if not candidates:
        yield []
        return
    if count > len(candidates):
        raise CacheConfigError(
            f"gpus_per_job is {count} but only {len(candidates)} GPU(s) are visible "
            f"({','.join(candidates)}): lower gpus_per_job in the config."
        )
    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        leased = wait_for_lease(count, candidates, lock_dir, stack, timeout_s, poll_s)
        log.info("Leased GPU(s) %s", ",".join(leased))
        with scoped_visible_devices(leased):
            yield leased


def wait_for_lease(
    count: int,
    candidates: Sequence[str],
    lock_dir: Path,
    stack: contextlib.ExitStack,
    timeout_s: float,
    poll_s: float,
) -> list[str]:
    """Poll until `count` of `candidates` are leased on `stack`; raise after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    leased = try_lease(count, candidates, lock_dir, stack)
    if leased is None:
        log.info(
            "All of GPU(s) %s are leased by other jobs (locks in %s); waiting for %d.",
            ",".join(candidates),
            lock_dir,
            count,
        )
    while leased is None:
        if time.monotonic() >= deadline:
            raise CacheConfigError(
                f"Waited {timeout_s:.0f} s for {count} free GPU(s) among "
                f"{','.join(candidates)}; other jobs hold their locks in {lock_dir}. "
                "Run Snakemake with --resources gpu=N where N is at most the number of "
                f"GPUs on this machine ({len(candidates)}), and check that no other "
                "workflow holds these GPUs."
            )
        time.sleep(poll_s)
        leased = try_lease(count, candidates, lock_dir, stack)
    return leased


def cuda_devices_problem(leased: Sequence[str], visible: str | None, cuda_uuids: Sequence[str]) -> str | None:
    """What is wrong with the GPUs CUDA gave this job (`cuda_uuids`, cuda:0 first) against its lease, which set
    CUDA_VISIBLE_DEVICES (now `visible`); None when they are the leased ones as far as can be told, or when
    the lease set nothing (SLURM's assignment used as it is). CUDA started before the lease sees every GPU
    instead of the leased ones; a lease of UUIDs is compared one by one."""
    if visible != ",".join(leased):
        return None
    if len(cuda_uuids) != len(leased):
        return (
            f"CUDA sees {len(cuda_uuids)} GPU(s) but this job leased {len(leased)} ({visible}): CUDA started "
            "before the lease set CUDA_VISIBLE_DEVICES, so this job could run on another job's GPU. Report it as a "
            "bug of eagle3-cache, with the job's log"
        )
    for index, (gpu, uuid) in enumerate(zip(leased, cuda_uuids, strict=True)):
        if gpu.startswith("GPU-") and gpu != uuid:
            return f"cuda:{index} is {uuid}, but this job leased {gpu}; report it as a bug of eagle3-cache"
    return None


def checked_cuda_devices(leased: Sequence[str]) -> list[str]:
    """After CUDA has started: the UUIDs of the GPUs this job runs on (cuda:0 first), refused unless they are
    its lease's (`cuda_devices_problem`)."""
    uuids = [f"GPU-{torch.cuda.get_device_properties(index).uuid}" for index in range(torch.cuda.device_count())]
    if problem := cuda_devices_problem(leased, os.environ.get("CUDA_VISIBLE_DEVICES"), uuids):
        raise CacheConfigError(problem)
    return uuids
