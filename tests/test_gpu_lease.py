"""GPU leases: distinct ids across real processes, released on SIGKILL, SLURM honoured."""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from eagle3_cache import gpu_lease
from eagle3_cache.errors import CacheConfigError
from eagle3_cache.gpu_lease import cuda_devices_problem, lease_gpus, visible_gpu_ids

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "workflow" / "scripts"

# A job: get ready, wait for the go file, lease, record what it held and when.
# The package dir is appended to sys.path, as Snakemake's script directive does.
HOLDER = """
import json, sys, time
from pathlib import Path

sys.path.append(sys.argv[5])
from eagle3_cache import gpu_lease
from eagle3_cache.gpu_lease import lease_gpus, visible_gpu_ids

count, go_file, hold_s = int(sys.argv[1]), Path(sys.argv[3]), float(sys.argv[4])
lock_dir = None if sys.argv[2] == "default" else sys.argv[2]
print("ready", flush=True)
while not go_file.exists():
    time.sleep(0.01)
with lease_gpus(count, lock_dir, poll_s=0.02, timeout_s=60) as gpus:
    import os
    start = time.monotonic()
    print(json.dumps({"gpus": gpus, "visible": os.environ["CUDA_VISIBLE_DEVICES"],
                      "start": start}), flush=True)
    time.sleep(hold_s)
    print(json.dumps({"end": time.monotonic()}), flush=True)
"""


def start_holder(
    count: int, lock_dir: Path | str, go_file: Path, hold_s: float, visible: str, slurm_job: str | None = None
):
    """A holder process; lock_dir "default" leases in the default folder (under TMPDIR, which the tests set)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "TMPDIR": str(go_file.parent)}
    env.pop("SLURM_JOB_ID", None)
    env.pop("SLURM_JOB_GPUS", None)
    if slurm_job is not None:
        env["SLURM_JOB_ID"] = slurm_job
    args = [count, lock_dir, go_file, hold_s, SCRIPTS_DIR]
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def no_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_JOB_GPUS", raising=False)


def test_concurrent_jobs_never_share_a_gpu(tmp_path):
    go_file = tmp_path / "go"
    counts = [1, 2, 1, 1, 2, 1]
    holders = [start_holder(count, tmp_path / "locks", go_file, 0.4, "0,1,2") for count in counts]
    for holder in holders:
        assert holder.stdout.readline().strip() == "ready"
    go_file.touch()
    leases = []
    for count, holder in zip(counts, holders, strict=True):
        out, _ = holder.communicate(timeout=120)
        assert holder.returncode == 0
        lease, end = (json.loads(line) for line in out.splitlines())
        assert len(lease["gpus"]) == count
        assert lease["visible"] == ",".join(lease["gpus"])
        leases.append((set(lease["gpus"]), lease["start"], end["end"]))

    for (gpus_a, start_a, end_a), (gpus_b, start_b, end_b) in itertools.combinations(leases, 2):
        if gpus_a & gpus_b:
            assert end_a <= start_b or end_b <= start_a, "two jobs held one GPU at once"
    # 8 GPU-leases of 0.4 s on 3 GPUs: some jobs must have waited for others.
    assert max(end for _, _, end in leases) - min(start for _, start, _ in leases) > 0.8


def held(holders: list[subprocess.Popen]) -> list[tuple[str, float, float]]:
    """What each started holder held (its visible devices) and when, once the go file is there."""
    leases = []
    for holder in holders:
        out, _ = holder.communicate(timeout=120)
        assert holder.returncode == 0
        lease, end = (json.loads(line) for line in out.splitlines())
        leases.append((lease["visible"], lease["start"], end["end"]))
    return leases


def started(holders: list[subprocess.Popen], go_file: Path) -> list[subprocess.Popen]:
    for holder in holders:
        assert holder.stdout.readline().strip() == "ready"
    go_file.touch()
    return holders


def test_jobs_inside_one_slurm_allocation_each_lease_their_own_gpu(tmp_path):
    """A local run under `salloc --gpus=4`: every job sees the allocation's four GPUs and takes one."""
    go_file = tmp_path / "go"
    holders = started([start_holder(1, "default", go_file, 0.5, "0,1,2,3", slurm_job="77") for _ in range(2)], go_file)
    (first, start_a, end_a), (second, start_b, end_b) = held(holders)
    assert {first, second} <= {"0", "1", "2", "3"} and first != second
    assert start_a < end_b and start_b < end_a, "the two jobs did not run side by side"
    assert (tmp_path / f"eagle3-cache-gpu-locks-{os.getuid()}-slurm-77").is_dir()


def test_separate_slurm_jobs_numbering_their_gpus_from_zero_do_not_wait_for_each_other(tmp_path):
    """Two sbatch jobs on one node, each given one GPU that it sees as 0: other GPUs, so no waiting."""
    go_file = tmp_path / "go"
    holders = started([start_holder(1, "default", go_file, 0.5, "0", slurm_job=job) for job in ("81", "82")], go_file)
    (first, start_a, end_a), (second, start_b, end_b) = held(holders)
    assert first == second == "0"
    assert start_a < end_b and start_b < end_a, "one job waited for another job's GPU"


def test_sigkilled_holder_releases_its_gpu(tmp_path, no_slurm):
    go_file = tmp_path / "go"
    go_file.touch()
    holder = start_holder(1, tmp_path / "locks", go_file, 600, "0")
    assert holder.stdout.readline().strip() == "ready"
    assert json.loads(holder.stdout.readline())["gpus"] == ["0"]

    with pytest.raises(CacheConfigError, match=r"--resources gpu=N"):
        with lease_gpus(1, tmp_path / "locks", candidates=["0"], timeout_s=0.2, poll_s=0.05):
            pass

    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with lease_gpus(1, tmp_path / "locks", candidates=["0"], timeout_s=5, poll_s=0.05) as gpus:
        assert gpus == ["0"]


def test_lease_sets_and_restores_visible_devices(tmp_path, no_slurm, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    with lease_gpus(1, tmp_path) as gpus:
        assert gpus == ["4"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4"
        with lease_gpus(1, tmp_path, candidates=["4", "7"]) as second:
            assert second == ["7"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,7"


def test_a_job_in_a_one_gpu_allocation_leases_that_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    with lease_gpus(1, tmp_path / "locks") as gpus:
        assert gpus == ["3"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3" and os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "CUDA_DEVICE_ORDER" not in os.environ
    assert (tmp_path / "locks" / "gpu-3.lock").exists()


def test_slurm_job_gpus_alone_are_used_as_they_are(tmp_path, monkeypatch):
    """Only the node's indices to go by, which this process may number otherwise: nothing to lease."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("SLURM_JOB_GPUS", "3")
    with lease_gpus(1, tmp_path / "locks") as gpus:
        assert gpus == ["3"]
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not (tmp_path / "locks").exists()


REAL_CDLL = ctypes.CDLL


def failing_nvml(name, *args, **kwargs):
    if name == gpu_lease.NVML_LIBRARY:
        raise OSError(f"{name}: cannot open shared object file")
    return REAL_CDLL(name, *args, **kwargs)


def test_without_nvml_the_gpus_are_counted_without_initialising_cuda(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_lease.ctypes, "CDLL", failing_nvml)
    proc = tmp_path / "gpus"
    for address in ("0000:07:00.0", "0000:0a:00.0"):
        (proc / address).mkdir(parents=True)
    monkeypatch.setattr(gpu_lease, "NVIDIA_PROC_GPUS", proc)

    def cuda_count():
        raise AssertionError("torch.cuda.device_count may initialise CUDA before the lease")

    monkeypatch.setattr(gpu_lease.torch.cuda, "device_count", cuda_count)
    assert visible_gpu_ids() == ["0", "1"]
    with lease_gpus(1, tmp_path / "locks") as gpus:
        assert gpus == ["0"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setattr(gpu_lease, "NVIDIA_PROC_GPUS", tmp_path / "absent")
    assert visible_gpu_ids() == []


def test_slurm_assignment_smaller_than_the_job_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(CacheConfigError, match="gpus_per_job is 2"):
        with lease_gpus(2, tmp_path):
            pass


@pytest.mark.parametrize(("count", "device"), [(0, "auto"), (1, "cpu")])
def test_cpu_jobs_lease_nothing(tmp_path, no_slurm, monkeypatch, count, device):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with lease_gpus(count, tmp_path / "locks", device=device) as gpus:
        assert gpus == []
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert not (tmp_path / "locks").exists()


def test_no_gpu_present_leases_nothing(tmp_path, no_slurm):
    with lease_gpus(1, tmp_path, candidates=[]) as gpus:
        assert gpus == []


def test_more_gpus_per_job_than_present_is_an_error(tmp_path, no_slurm):
    with pytest.raises(CacheConfigError, match="only 2 GPU"):
        with lease_gpus(3, tmp_path, candidates=["0", "1"]):
            pass


@pytest.mark.parametrize(
    ("leased", "visible", "cuda_uuids", "problem"),
    [
        (["2"], "2", ["GPU-b"], None),
        (
            ["0", "1"],
            "0,1",
            ["GPU-a", "GPU-b", "GPU-c", "GPU-d"],
            r"CUDA sees 4 GPU\(s\) but this job leased 2 \(0,1\): CUDA started before",
        ),
        (["GPU-a"], "GPU-a", ["GPU-b"], r"cuda:0 is GPU-b, but this job leased GPU-a"),
        (["GPU-a"], "GPU-a", ["GPU-a"], None),
        # SLURM_JOB_GPUS alone: the lease set no variable, so there is nothing to hold CUDA to.
        (["0", "1"], None, ["GPU-a", "GPU-b", "GPU-c"], None),
    ],
    ids=["index", "cuda-started-first", "uuid-mismatch", "uuid", "slurm-job-gpus"],
)
def test_the_gpus_cuda_gives_a_job_are_held_to_its_lease(leased, visible, cuda_uuids, problem):
    found = cuda_devices_problem(leased, visible, cuda_uuids)
    assert found is None if problem is None else re.search(problem, found), found
