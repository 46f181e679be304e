"""The workflow end to end, through the `snakemake` command line, on a tiny random model.

One completed run is built per session; each test that changes something works on its own
copy of it (mtimes and Snakemake's metadata included), so the tests do not depend on each
other. What reran is read from the job headers Snakemake prints for every job it executes.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import (
    AFTER_SHARDS,
    HOLD_SHARD,
    LOCAL_RUN,
    NUM_CONVERSATIONS,
    NUM_SHARDS,
    REPO,
    RUN_TIMEOUT_S,
    SNAKEMAKE,
    assert_complete_cache,
    cache_dir,
    digest,
    every_shard,
    jobs_run,
    new_workdir,
    run_config,
    shard_jobs,
    shard_path,
    snakemake,
    write_config,
)

# --- End to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_first_run_builds_every_step(completed):
    workdir, jobs = completed
    assert jobs == {"tokenize", "select_vocab", "target_embeddings"} | AFTER_SHARDS | every_shard()
    assert_complete_cache(workdir, NUM_SHARDS)


@pytest.mark.slow
def test_1_second_run_does_nothing(workdir):
    result = snakemake(workdir)
    assert jobs_run(result.stdout) == set()
    assert "Nothing to be done" in result.stdout


@pytest.mark.slow
def test_2_batch_size_changes_nothing(workdir, tiny_chat_target):
    write_config(workdir, run_config(tiny_chat_target, batch_size=3))
    assert jobs_run(snakemake(workdir).stdout) == set()


@pytest.mark.slow
def test_3_draft_vocab_size_reruns_vocab_and_everything_after(workdir, tiny_chat_target):
    write_config(workdir, run_config(tiny_chat_target, draft_vocab_size=48))
    jobs = jobs_run(snakemake(workdir).stdout)
    assert jobs == {"select_vocab"} | AFTER_SHARDS | every_shard()
    manifest = json.loads((cache_dir(workdir) / "manifest.json").read_text())
    assert manifest["draft_vocab_size"] == 48


@pytest.mark.slow
def test_4_seq_length_reruns_from_tokenization(workdir, tiny_chat_target):
    write_config(workdir, run_config(tiny_chat_target, seq_length=24))
    jobs = jobs_run(snakemake(workdir).stdout)
    assert jobs == {"tokenize", "select_vocab"} | AFTER_SHARDS | every_shard()


@pytest.mark.slow
def test_5_deleted_shard_reruns_only_that_shard(workdir):
    shard_path(workdir, 2).unlink()
    jobs = jobs_run(snakemake(workdir).stdout)
    assert jobs == shard_jobs(2) | AFTER_SHARDS
    assert_complete_cache(workdir, NUM_SHARDS)


@pytest.mark.slow
def test_6_forced_shard_is_recomputed_with_identical_bytes(workdir):
    target = shard_path(workdir, 1)
    before = digest(target), target.stat().st_mtime_ns
    result = snakemake(workdir, str(target.relative_to(workdir)), "--force")
    assert jobs_run(result.stdout) == {"compute_shard-000001"}
    assert target.stat().st_mtime_ns != before[1]
    assert digest(target) == before[0]


@pytest.mark.slow
def test_7_new_shard_size_leaves_exactly_the_new_shard_set(workdir, tiny_chat_target):
    for shard_size in (3, 10):
        num_shards = -(-NUM_CONVERSATIONS // shard_size)
        write_config(workdir, run_config(tiny_chat_target, shard_size=shard_size))
        jobs = jobs_run(snakemake(workdir).stdout)
        assert jobs == AFTER_SHARDS | every_shard(num_shards)
        assert_complete_cache(workdir, num_shards)
        assert_automodel_reads(cache_dir(workdir), shard_size)


def assert_automodel_reads(cache: Path, shard_size: int) -> None:
    eagle3_cache = pytest.importorskip("nemo_automodel.components.datasets.llm.eagle3_cache")
    dataset = eagle3_cache.CachedEagle3Dataset(str(cache))
    assert len(dataset) == NUM_CONVERSATIONS
    assert dataset.shard_size == shard_size
    last = dataset[NUM_CONVERSATIONS - 1]
    assert last["input_ids"].shape == (32,)
    assert last["target_probs"].shape == (32, 64)


def kill_shard_writer_mid_write(workdir: Path, hook_dir: Path) -> subprocess.CompletedProcess:
    """Run the workflow, SIGKILL the job writing shard-000001 at its write, return the run."""
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOLD_SHARD)
    marker = hook_dir / "writer.pid"
    env = {**os.environ, "PYTHONPATH": str(hook_dir), "HOLD_MARKER": str(marker)}
    run = subprocess.Popen(
        [SNAKEMAKE, *LOCAL_RUN],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not marker.exists() or not marker.read_text():
            assert run.poll() is None, f"snakemake ended before the write:\n{run.stdout.read()}"
            assert time.monotonic() < deadline, "the shard job never reached its write"
            time.sleep(0.2)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        output, _ = run.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        run.kill()
    return subprocess.CompletedProcess(run.args, run.returncode, output)


@pytest.mark.slow
def test_8_killed_shard_job_leaves_no_shard_and_the_next_run_completes(workdir, completed, tmp_path):
    shard_path(workdir, 1).unlink()
    killed = kill_shard_writer_mid_write(workdir, tmp_path / "hook")
    assert killed.returncode != 0, killed.stdout[-6000:]
    assert not shard_path(workdir, 1).exists()

    result = snakemake(workdir, check=False)
    if "--rerun-incomplete" in result.stdout:
        result = snakemake(workdir, "--rerun-incomplete")
    assert result.returncode == 0, result.stdout[-6000:]
    assert jobs_run(result.stdout) == shard_jobs(1) | AFTER_SHARDS
    assert_complete_cache(workdir, NUM_SHARDS)
    assert digest(shard_path(workdir, 1)) == digest(shard_path(completed[0], 1))


@pytest.mark.slow
def test_9_a_bare_snakemake_after_a_code_only_edit_plans_nothing(workdir):
    for script in (workdir / "workflow" / "scripts").glob("*.py"):
        script.write_text(script.read_text() + "# An edit that changes no result.\n")
    result = snakemake_static(workdir, "-n")
    assert result.returncode == 0, result.stdout
    assert jobs_run(result.stdout) == set()
    assert "Nothing to be done" in result.stdout


# --- Static checks (fast) -------------------------------------------------------------------

HUB_MODEL = "example-org/example-model"


def snakemake_static(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """snakemake without the profile; output is stdout and stderr together."""
    return subprocess.run(
        ["timeout", "-k", "10", "300", SNAKEMAKE, *args],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_lint_is_clean(tmp_path):
    workdir = new_workdir(tmp_path, run_config(HUB_MODEL))
    result = snakemake_static(workdir, "--lint")
    assert result.returncode == 0, result.stdout
    assert "Lints for" not in result.stdout


def test_snakefmt_is_clean():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakefmt")), "--check", "."],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("profile", ["profiles/local", "profiles/slurm"])
def test_dry_run_before_tokenization_plans_up_to_the_checkpoint(tmp_path, profile):
    workdir = new_workdir(tmp_path, run_config(HUB_MODEL))
    result = snakemake_static(workdir, "--profile", profile, "-n")
    assert result.returncode == 0, result.stdout
    assert jobs_run(result.stdout) == {
        "tokenize",
        "select_vocab",
        "target_embeddings",
        "manifest",
        "parity",
        "validate",
    }


def test_demo_dry_run_converts_the_model_first(tmp_path):
    workdir = new_workdir(tmp_path, {})
    shutil.copytree(REPO / "config", workdir / "config", dirs_exist_ok=True)
    result = snakemake_static(workdir, "-n")
    assert result.returncode == 0, result.stdout
    assert "convert_demo_model" in jobs_run(result.stdout)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (run_config(HUB_MODEL, sequence_length=512), "sequence_length"),
        (run_config(HUB_MODEL, seq_length="long"), "seq_length"),
        ({**run_config(HUB_MODEL), "gpus_per_job": 0}, "gpus_per_job"),
        ({**run_config(HUB_MODEL), "validation": {"samples": 3}}, "samples"),
    ],
)
def test_config_errors_name_the_key(tmp_path, config, named):
    workdir = new_workdir(tmp_path, config)
    result = snakemake_static(workdir, "-n")
    assert result.returncode != 0
    assert "Error validating config file" in result.stdout
    assert named in result.stdout


def test_conda_env_records_the_requirements_it_installs():
    env_file = (REPO / "envs" / "eagle3-cache.yaml").read_text()
    requirements = (REPO / "envs" / "requirements.txt").read_bytes()
    recorded = re.search(r"requirements.txt sha256: (\w+)", env_file).group(1)
    assert recorded == hashlib.sha256(requirements).hexdigest(), (
        "envs/requirements.txt changed: update its sha256 in envs/eagle3-cache.yaml"
    )
