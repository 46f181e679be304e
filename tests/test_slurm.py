"""Cluster execution on a real (throw-away, single-node) SLURM cluster.

Every test here talks to the cluster that tests/slurm_cluster.py starts: four fake GPUs,
one partition, no accounting database. The workflow runs through
snakemake-executor-plugin-slurm with the user's profile plus the test cluster's overrides,
on the tiny model and conversations the workflow tests use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from eagle3_cache.layout import shard_id
from helpers import (
    HOLD_SHARD,
    NUM_SHARDS,
    RUN,
    TOKENIZE_PARTS,
    assert_complete_cache,
    digest,
    new_workdir,
    run_config,
    shard_path,
    snakemake_argv,
)
from slurm_cluster import SlurmCluster, require_slurm, running_slurm_cluster, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PROFILES = ["--profile", "profiles/slurm", "--profile", "profiles/slurm-test"]
RUN_TIMEOUT_S = 600
BATCH_SUBMISSION = re.compile(r"_slurm_rpc_submit_batch_job: JobId=(\d+)")


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    comment: str  # the plugin's "rule_<rule>[_wildcards_<values>]"
    state: str
    start: datetime
    end: datetime


@dataclass(frozen=True)
class ShardRecord:
    """What a shard job's stats JSON says about where it ran."""

    shard: int
    job_id: str
    gpus: str


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    require_slurm()
    with running_slurm_cluster() as started:
        yield started


@pytest.fixture(scope="module")
def completed_on_cluster(
    cluster: SlurmCluster, tiny_chat_target: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A workdir where the whole workflow ran once through SLURM; prints the run's figures."""
    workdir = new_workdir(tmp_path_factory.mktemp("slurm-run"), slurm_run_config(tiny_chat_target))
    submitted_before = len(batch_submissions(cluster))
    started = time.monotonic()
    result = snakemake_on_cluster(cluster, workdir)
    wall_s = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-6000:]
    gpus = {record.gpus for record in shard_records(workdir)}
    print(
        f"\nSLURM run: {len(batch_submissions(cluster)) - submitted_before} jobs submitted, "
        f"{len(gpus)} distinct GPU indices seen by shard jobs ({', '.join(sorted(gpus))}), "
        f"wall time {wall_s:.0f} s"
    )
    return workdir


def test_concurrent_jobs_get_distinct_gpus(cluster: SlurmCluster, tmp_path: Path) -> None:
    outputs = [tmp_path / f"job{index}.out" for index in range(cluster.gpus)]
    for output in outputs:
        # The sleep keeps all jobs running at once, so no GPU is handed out twice.
        cluster.run(
            "sbatch",
            "--gpus=1",
            f"--output={output}",
            "--wrap",
            "echo $CUDA_VISIBLE_DEVICES; sleep 5",
        )
    wait_for(lambda: not cluster.unfinished_job_ids(), "the jobs to finish")
    seen = [output.read_text().strip() for output in outputs]
    assert sorted(seen) == [str(index) for index in range(cluster.gpus)]


def test_every_shard_runs_as_its_own_sbatch_job_on_its_own_gpu(
    cluster: SlurmCluster, completed_on_cluster: Path
) -> None:
    workdir = completed_on_cluster
    assert_complete_cache(workdir, NUM_SHARDS)
    records = shard_records(workdir)
    jobs = slurm_jobs(cluster)
    batch_jobs = set(batch_submissions(cluster))
    for record in records:
        assert record.job_id in batch_jobs, f"shard {record.shard} ran outside an sbatch job"
        assert jobs[record.job_id].comment == f"rule_compute_shard_wildcards_{RUN}_{record.shard:06d}"
        assert jobs[record.job_id].state == "COMPLETED"
        assert plugin_job_log(workdir, record.job_id).is_file()
        assert record.gpus in {str(index) for index in range(cluster.gpus)}
    assert len({record.job_id for record in records}) == NUM_SHARDS
    assert_no_gpu_shared_at_once(records, jobs)
    # Three shards submitted at once, four GPUs: at least two jobs overlapped, so more than one index was used.
    assert len({record.gpus for record in records}) > 1


def test_tokenization_and_validation_run_a_cpu_job_per_part_and_shard_and_one_gpu_parity_job(
    cluster: SlurmCluster, completed_on_cluster: Path
) -> None:
    requested = requested_tres(cluster)
    parts = {f"rule_tokenize_part_wildcards_{RUN}_{index:06d}" for index in range(TOKENIZE_PARTS)}
    verify = {f"rule_verify_shard_wildcards_{RUN}_{index:06d}" for index in range(NUM_SHARDS)}
    assert parts | verify <= requested.keys(), sorted(requested)
    assert all("gpu" not in requested[comment] for comment in parts | verify), {c: requested[c] for c in verify}
    assert "gpu" in requested[f"rule_parity_wildcards_{RUN}"]
    assert "gpu" not in requested[f"rule_validate_wildcards_{RUN}"]


def requested_tres(cluster: SlurmCluster) -> dict[str, str]:
    """The trackable resources each job slurmctld remembers asked for, by the plugin's comment (its rule)."""
    listing = cluster.run("squeue", "--states=all", "--noheader", "--Format=Comment:|,tres-per-job:")
    return dict(line.strip().split("|", 1) for line in listing.splitlines() if "|" in line)


def test_cancelled_shard_job_fails_the_run_and_a_rerun_completes(
    cluster: SlurmCluster, completed_on_cluster: Path, tmp_path: Path
) -> None:
    workdir = Path(shutil.copytree(completed_on_cluster, tmp_path / "workdir", symlinks=True))
    for index in (1, 2):
        shard_path(workdir, index).unlink()
    # Holds shard-000001 just before its temp file is moved into place (see test_workflow).
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOLD_SHARD)
    marker = tmp_path / "writer.pid"
    hold = {"PYTHONPATH": str(hook_dir), "HOLD_MARKER": str(marker)}

    run = start_snakemake_on_cluster(cluster, workdir, extra_env=hold)
    try:
        wait_for(
            lambda: marker.exists() or run.poll() is not None,
            "shard 1 to reach its write",
            RUN_TIMEOUT_S,
        )
        assert run.poll() is None, f"snakemake ended before shard 1 was written:\n{run.stdout.read()}"
        cancelled = running_job_of_shard(cluster, 1)
        cluster.run("scancel", cancelled)
        output, _ = run.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        kill_if_running(run)
    assert run.returncode not in (0, 124, 137), f"snakemake did not fail cleanly:\n{output[-6000:]}"
    assert f"SLURM-job '{cancelled}' failed" in output
    assert not shard_path(workdir, 1).exists()
    assert shard_path(workdir, 2).exists(), "the shard job running beside the cancelled one did not finish"

    # The manifest is the cache's commit point; validation was covered by the first run. The shard jobs
    # retired the old report with the old manifest, and the manifest alone does not write a new one.
    rerun = snakemake_on_cluster(cluster, workdir, f"results/{RUN}/shards/manifest.json")
    assert rerun.returncode == 0, rerun.stdout[-6000:]
    assert_complete_cache(workdir, NUM_SHARDS, reported=False)
    assert shard_records(workdir)[1].job_id in batch_submissions(cluster)
    for index in range(NUM_SHARDS):
        assert digest(shard_path(workdir, index)) == digest(shard_path(completed_on_cluster, index))


def slurm_run_config(tiny_chat_target: Path) -> dict:
    # device "auto" (the tests' default is "cpu") makes every shard job ask SLURM for a GPU;
    # on a machine without CUDA the model still runs on the CPU.
    return {**run_config(tiny_chat_target), "device": "auto"}


def snakemake_on_cluster(cluster: SlurmCluster, workdir: Path, *targets: str) -> subprocess.CompletedProcess:
    """Run the workflow through SLURM to its end; output is stdout and stderr together."""
    run = start_snakemake_on_cluster(cluster, workdir, *targets)
    output, _ = run.communicate()
    return subprocess.CompletedProcess(run.args, run.returncode, output)


def start_snakemake_on_cluster(
    cluster: SlurmCluster, workdir: Path, *targets: str, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    # Snakemake ignores SIGTERM while jobs run, hence the SIGKILL after the grace period.
    command = ["timeout", "-k", "10", str(RUN_TIMEOUT_S), *snakemake_argv(*PROFILES, *targets)]
    return subprocess.Popen(
        command,
        cwd=workdir,
        env={**cluster.env, **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_if_running(run: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group: killing `timeout` alone leaves snakemake behind."""
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()


def shard_records(workdir: Path) -> list[ShardRecord]:
    records = []
    for index in range(NUM_SHARDS):
        stats = json.loads((workdir / "results" / RUN / "shard_stats" / f"shard-{shard_id(index)}.json").read_text())
        records.append(ShardRecord(index, stats["slurm_job_id"], stats["cuda_visible_devices"]))
    return records


def batch_submissions(cluster: SlurmCluster) -> list[str]:
    """Ids of every job submitted with sbatch, as slurmctld logged them."""
    return BATCH_SUBMISSION.findall(cluster.slurmctld_log.read_text())


def slurm_jobs(cluster: SlurmCluster) -> dict[str, SlurmJob]:
    """Every job slurmctld still remembers (finished ones for MinJobAge), by id; call it once
    all jobs have started (a pending job has no start time)."""
    listing = cluster.run("squeue", "--states=all", "--noheader", "--format=%i|%k|%T|%S|%e")
    jobs = {}
    for line in listing.splitlines():
        job_id, comment, state, start, end = line.split("|")
        jobs[job_id] = SlurmJob(job_id, comment, state, datetime.fromisoformat(start), datetime.fromisoformat(end))
    return jobs


def running_job_of_shard(cluster: SlurmCluster, shard: int) -> str:
    comment = f"rule_compute_shard_wildcards_{RUN}_{shard:06d}"
    listing = cluster.run("squeue", "--states=RUNNING", "--noheader", "--format=%i|%k")
    running = [line.split("|")[0] for line in listing.splitlines() if line.split("|")[1] == comment]
    assert len(running) == 1, f"expected one running job for shard {shard}:\n{listing}"
    return running[0]


def plugin_job_log(workdir: Path, job_id: str) -> Path:
    matches = list((workdir / ".snakemake" / "slurm_logs" / "rule_compute_shard").glob(f"*/{job_id}.log"))
    assert len(matches) == 1, f"no single plugin log for SLURM job {job_id}: {matches}"
    return matches[0]


def assert_no_gpu_shared_at_once(records: list[ShardRecord], jobs: dict[str, SlurmJob]) -> None:
    for first in records:
        for second in records:
            a, b = jobs[first.job_id], jobs[second.job_id]
            overlapped = a.start < b.end and b.start < a.end
            if first.shard < second.shard and overlapped:
                assert first.gpus != second.gpus, f"shards {first.shard} and {second.shard} shared GPU {first.gpus}"
