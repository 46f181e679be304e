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
import yaml

from eagle3_cache.shard_format import check_cache

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
WORKFLOW_FILES = ["Snakefile", "workflow", "profiles", "envs"]
RUN = "tiny"
NUM_CONVERSATIONS = 20
SHARD_SIZE = 4
NUM_SHARDS = 5
RUN_TIMEOUT_S = 900
# One thread per target-model job, so that two shard jobs share the 2 cores of a CI machine.
LOCAL_RUN = ["--profile", "profiles/local", "--set-threads", "compute_shard=1", "validate=1", "--cores", "2"]

JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")
SHARD_WILDCARD = re.compile(r"^\s+wildcards: .*\bshard=(\d{6})")

WORDS = (
    "the model reads every token and writes a short answer about rivers cities numbers "
    "colors music weather trains gardens bread stars"
).split()


def every_shard(count: int = NUM_SHARDS) -> set[str]:
    return {f"compute_shard-{index:06d}" for index in range(count)}


# --- Setup ----------------------------------------------------------------------------------


def conversation(index: int) -> dict:
    """A short deterministic user/assistant exchange; lengths vary with the index."""

    def text(start: int, length: int) -> str:
        return " ".join(WORDS[(start + i * 7) % len(WORDS)] for i in range(length))

    return {
        "messages": [
            {"role": "user", "content": text(index, 2 + index % 5)},
            {"role": "assistant", "content": text(index * 3, 3 + index % 7)},
        ]
    }


def run_config(target_model: str | Path, **overrides) -> dict:
    settings = {
        "target_model": str(target_model),
        "input_data": "data/conversations.jsonl",
        "seq_length": 32,
        "draft_vocab_size": 64,
        "shard_size": SHARD_SIZE,
        "batch_size": 2,
    }
    settings.update(overrides)
    # Not strict: a random model's predictions fail the report's quality thresholds.
    validation = {"num_samples": 2, "strict": False}
    return {"runs": {RUN: settings}, "device": "cpu", "validation": validation}


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))


def new_workdir(path: Path, config: dict) -> Path:
    """A copy of the workflow with `config` and the tiny conversations."""
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, path / name)
    (path / "config").mkdir()
    write_config(path, config)
    (path / "data").mkdir()
    lines = [json.dumps(conversation(index)) for index in range(NUM_CONVERSATIONS)]
    (path / "data" / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    return path


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run snakemake with the local profile on 2 cores; output is stdout and stderr together."""
    command = ["timeout", "-k", "10", str(RUN_TIMEOUT_S), SNAKEMAKE, *LOCAL_RUN, *args]
    result = subprocess.run(
        command,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return result


def jobs_run(output: str) -> set[str]:
    """The jobs a snakemake run executed ("compute_shard-000003" for a shard), `all` left out."""
    jobs = []
    for line in output.splitlines():
        header = JOB_HEADER.match(line)
        shard = SHARD_WILDCARD.match(line)
        if header:
            jobs.append(header.group(1))
        elif shard and jobs and jobs[-1] in ("compute_shard", "compute_specforge_shard"):
            jobs[-1] = f"{jobs[-1]}-{shard.group(1)}"
    assert len(jobs) == len(set(jobs)), f"a job ran twice: {jobs}"
    return set(jobs) - {"all"}


def cache_dir(workdir: Path) -> Path:
    return workdir / "results" / RUN / "shards"


def shard_path(workdir: Path, index: int) -> Path:
    return cache_dir(workdir) / f"shard-{index:06d}.safetensors"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def completed(tmp_path_factory, tiny_chat_target) -> tuple[Path, set[str]]:
    """A workdir where the whole workflow ran once, and the jobs that first run executed."""
    workdir = new_workdir(tmp_path_factory.mktemp("completed"), run_config(tiny_chat_target))
    return workdir, jobs_run(snakemake(workdir).stdout)


@pytest.fixture
def workdir(completed, tmp_path) -> Path:
    """A private copy of the completed workdir (timestamps and Snakemake metadata kept)."""
    return Path(shutil.copytree(completed[0], tmp_path / "workdir", symlinks=True))


def assert_complete_cache(workdir: Path, num_shards: int) -> None:
    """Exactly the expected files in the cache dir, all checks passing, report written."""
    expected = {shard_path(workdir, index).name for index in range(num_shards)}
    expected |= {"manifest.json", "target_embeddings.safetensors"}
    assert {path.name for path in cache_dir(workdir).iterdir()} == expected
    assert check_cache(cache_dir(workdir)) == []
    assert (workdir / "results" / RUN / "validation_report.html").is_file()


# --- End to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_first_run_builds_every_step(completed):
    workdir, jobs = completed
    assert jobs == {"tokenize", "select_vocab", "target_embeddings", "manifest", "validate"} | every_shard()
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
    assert jobs == {"select_vocab", "manifest", "validate"} | every_shard()
    manifest = json.loads((cache_dir(workdir) / "manifest.json").read_text())
    assert manifest["draft_vocab_size"] == 48


@pytest.mark.slow
def test_4_seq_length_reruns_from_tokenization(workdir, tiny_chat_target):
    write_config(workdir, run_config(tiny_chat_target, seq_length=24))
    jobs = jobs_run(snakemake(workdir).stdout)
    assert jobs == {"tokenize", "select_vocab", "manifest", "validate"} | every_shard()


@pytest.mark.slow
def test_5_deleted_shard_reruns_only_that_shard(workdir):
    shard_path(workdir, 2).unlink()
    jobs = jobs_run(snakemake(workdir).stdout)
    assert jobs == {"compute_shard-000002", "manifest", "validate"}
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
        assert jobs == {"manifest", "validate"} | every_shard(num_shards)
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


# Injected into the shard job through PYTHONPATH: holds the shard named by HOLD_DESTINATION just
# before its temp file is moved into place and tells the test the writer's pid, so that the SIGKILL
# lands while the shard is still being written.
HOLD_SHARD = """
import os, time
from pathlib import Path

_replace = os.replace


def replace(source, destination, *args, **kwargs):
    if str(destination).endswith(os.environ["HOLD_DESTINATION"]):
        Path(os.environ["HOLD_MARKER"]).write_text(str(os.getpid()))
        time.sleep(3600)
    return _replace(source, destination, *args, **kwargs)


os.replace = replace
"""


def kill_shard_writer_mid_write(
    workdir: Path, hook_dir: Path, destination: str = "shard-000001.safetensors"
) -> subprocess.CompletedProcess:
    """Run the workflow, SIGKILL the job writing `destination` at its final rename, return the run."""
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOLD_SHARD)
    marker = hook_dir / "writer.pid"
    env = {**os.environ, "PYTHONPATH": str(hook_dir), "HOLD_MARKER": str(marker), "HOLD_DESTINATION": destination}
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
def test_8_killed_shard_job_leaves_no_shard_and_the_next_run_completes(
    workdir, completed, tmp_path
):
    shard_path(workdir, 1).unlink()
    killed = kill_shard_writer_mid_write(workdir, tmp_path / "hook")
    assert killed.returncode != 0, killed.stdout[-6000:]
    assert not shard_path(workdir, 1).exists()

    result = snakemake(workdir, check=False)
    if "--rerun-incomplete" in result.stdout:
        result = snakemake(workdir, "--rerun-incomplete")
    assert result.returncode == 0, result.stdout[-6000:]
    assert jobs_run(result.stdout) == {"compute_shard-000001", "manifest", "validate"}
    assert_complete_cache(workdir, NUM_SHARDS)
    assert digest(shard_path(workdir, 1)) == digest(shard_path(completed[0], 1))


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
