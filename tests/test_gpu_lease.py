"""GPU leases: distinct ids across real processes, released on SIGKILL, SLURM honoured."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from eagle3_cache.errors import CacheConfigError
from eagle3_cache.gpu_lease import lease_gpus

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "workflow" / "scripts"

# A job: get ready, wait for the go file, lease, record what it held and when.
# The package dir is appended to sys.path, as Snakemake's script directive does.
HOLDER = """
import json, sys, time
from pathlib import Path

sys.path.append(sys.argv[5])
from eagle3_cache.gpu_lease import lease_gpus

count, lock_dir, go_file, hold_s = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
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


def start_holder(count: int, lock_dir: Path, go_file: Path, hold_s: float, visible: str):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    env.pop("SLURM_JOB_ID", None)
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


@pytest.mark.parametrize(
    "scheduler_env",
    [
        {"CUDA_VISIBLE_DEVICES": "3"},
        {"SLURM_JOB_GPUS": "3"},
    ],
)
def test_slurm_assignment_is_used_as_is(tmp_path, monkeypatch, scheduler_env):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    for name, value in scheduler_env.items():
        monkeypatch.setenv(name, value)
    with lease_gpus(1, tmp_path / "locks") as gpus:
        assert gpus == ["3"]
        assert os.environ.get("CUDA_VISIBLE_DEVICES") == scheduler_env.get("CUDA_VISIBLE_DEVICES")
    assert not (tmp_path / "locks").exists()


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
