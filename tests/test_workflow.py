"""The workflow end to end, through the `snakemake` command line, on a tiny random model.

One completed run is built per session (conftest's `completed`); each test that changes something
works on its own copy of it (`workdir`: mtimes and Snakemake's metadata included), so the tests do
not depend on each other. What reran is read from the job headers Snakemake prints for every job it
executes.
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eagle3_cache.layout import MANIFEST_FILE
from helpers import (
    AFTER_SHARDS,
    HUB_MODEL,
    LOCAL_RUN,
    NUM_CONVERSATIONS,
    NUM_SHARDS,
    REPO,
    RUN,
    RUN_TIMEOUT_S,
    TOKENIZATION,
    assert_complete_cache,
    cache_dir,
    digest,
    every_shard,
    jobs_run,
    kill_shard_writer_mid_write,
    new_workdir,
    run_config,
    shard_jobs,
    shard_path,
    snakemake,
    snakemake_argv,
    snakemake_static,
    write_config,
)

# --- End to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_first_run_builds_every_step(completed):
    workdir, jobs = completed
    assert jobs == TOKENIZATION | {"select_vocab", "plan", "target_embeddings"} | AFTER_SHARDS | every_shard()
    assert_complete_cache(workdir, NUM_SHARDS)


@pytest.mark.slow
def test_1_second_run_does_nothing(workdir):
    result = snakemake(workdir)
    assert jobs_run(result.stdout) == set()
    assert "Nothing to be done" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("run_settings", "global_settings"),
    [({"batch_size": 3}, {}), ({}, {"plan": {"margin": 0.5, "check_free_space": False}})],
    ids=["batch_size", "plan"],
)
def test_2_batch_size_and_the_plan_check_change_nothing(workdir, tiny_chat_target, run_settings, global_settings):
    write_config(workdir, {**run_config(tiny_chat_target, **run_settings), **global_settings})
    assert jobs_run(snakemake(workdir).stdout) == set()


@pytest.mark.slow
def test_3_draft_vocab_size_reruns_vocab_and_everything_after(workdir, tiny_chat_target):
    write_config(workdir, run_config(tiny_chat_target, draft_vocab_size=48))
    jobs = jobs_run(snakemake(workdir).stdout)
    assert jobs == {"select_vocab", "plan", "target_embeddings"} | AFTER_SHARDS | every_shard()
    manifest = json.loads((cache_dir(workdir) / "manifest.json").read_text())
    assert manifest["draft_vocab_size"] == 48


@pytest.mark.slow
def test_4_seq_length_reruns_from_tokenization(workdir, tiny_chat_target):
    write_config(workdir, run_config(tiny_chat_target, seq_length=24))
    jobs = jobs_run(snakemake(workdir).stdout)
    # The index holds which conversations each part has, not how they are tokenized.
    tokenization = TOKENIZATION - {"index_conversations"}
    assert jobs == tokenization | {"select_vocab", "plan", "target_embeddings"} | AFTER_SHARDS | every_shard()


@pytest.mark.slow
def test_4b_compute_dtype_reruns_every_shard_and_live_parity_follows_it(workdir, tiny_chat_target):
    """bf16 compute on the CPU: every shard reruns, records it, and passes validation under the bf16 rule."""
    write_config(workdir, run_config(tiny_chat_target, compute_dtype="bf16"))
    jobs = jobs_run(snakemake(workdir).stdout)
    assert jobs == AFTER_SHARDS | every_shard()
    run_dir = workdir / "results" / RUN
    stats = [json.loads(path.read_text()) for path in sorted((run_dir / "shard_stats").glob("*.json"))]
    assert {s["compute_dtype"] for s in stats} == {"bfloat16"} and len(stats) == NUM_SHARDS
    assert json.loads((cache_dir(workdir) / "manifest.json").read_text())["compute_dtype"] == "bf16"
    parity = next(c for c in json.loads((run_dir / "validation.json").read_text())["checks"] if c["key"] == "parity")
    assert parity["passed"] and parity["figures"]["tolerance"].startswith("per position")


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
        assert jobs == {"plan", "target_embeddings"} | AFTER_SHARDS | every_shard(num_shards)
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
def test_the_disk_plan_predicts_the_cache_it_precedes(completed):
    workdir, _ = completed
    run_dir = workdir / "results" / RUN
    plan = json.loads((run_dir / "plan.json").read_text())
    files = [cache_dir(workdir) / f["file"] for f in plan["files"]]
    apparent = sum(path.stat().st_size for path in files)
    allocated = sum(path.stat().st_blocks * 512 for path in files)
    assert plan["apparent_bytes"] == apparent
    assert abs(allocated / plan["allocated_bytes"] - 1) <= 0.01, (allocated, plan["allocated_bytes"])
    assert (cache_dir(workdir) / "manifest.json").stat().st_size <= plan["manifest_bytes_bound"]
    disk = next(c for c in json.loads((run_dir / "validation.json").read_text())["checks"] if c["key"] == "disk")
    assert disk["figures"]["planned_bytes"] == plan["apparent_bytes"]
    assert disk["figures"]["planned_bytes_error_share"] == 0


@pytest.mark.slow
def test_the_plan_comes_before_every_shard(workdir):
    result = snakemake_static(workdir, "--rulegraph")
    assert result.returncode == 0, result.stdout
    ids = dict(re.findall(r"^\s*(\d+)\[label = \"(\w+)\"", result.stdout, re.MULTILINE))
    edges = {(ids[a], ids[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)$", result.stdout, re.MULTILINE)}
    assert {("tokenize", "plan"), ("plan", "compute_shard")} <= edges


def private_tmpfs_prefix(probe: Path) -> list[str] | None:
    """An `unshare` command line under which `mount -t tmpfs` works, in a mount namespace of its own (the
    mount vanishes with the process): as root, or through an unprivileged user namespace; None if neither."""
    if shutil.which("unshare") is None:
        return None
    probe.mkdir()
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        mount = subprocess.run(
            [*prefix, "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True
        )
        if mount.returncode == 0:
            return prefix
    return None


# Inside the private mount namespace: a 256 KiB results/, a full run, then the plan alone with the check off,
# then the whole run with the check off, which fills the disk.
SMALL_DISK_SCRIPT = """
mount -t tmpfs -o size=256k tmpfs results || exit 90
"$0" "$@" > refused.out 2>&1; echo $? > refused.rc
cp logs/tiny/plan.log refused-plan.log
"$0" "$@" results/tiny/plan.json --configfile config/anyway.yaml > anyway.out 2>&1; echo $? > anyway.rc
cp results/tiny/plan.json anyway-plan.json
find results/tiny/shards -type f > cache-files.txt
"$0" "$@" --configfile config/anyway.yaml > full.out 2>&1; echo $? > full.rc
# Snakemake removes the cache directory of a failed run when it is left empty.
find results/tiny/shards -type f > full-cache-files.txt 2>/dev/null || true
"""


@pytest.mark.slow
def test_a_cache_bigger_than_the_disk_stops_before_the_first_shard(tmp_path, tiny_chat_target):
    prefix = private_tmpfs_prefix(tmp_path / "probe")
    if prefix is None:
        pytest.skip("cannot mount a tmpfs: needs root or unprivileged user namespaces (unshare --user --mount)")
    # Full fp32 distributions over the whole vocabulary: about 0.65 MB of shards for 256 KiB of disk.
    (tmp_path / "workdir").mkdir()
    workdir = new_workdir(tmp_path / "workdir", run_config(tiny_chat_target, draft_vocab_size=None, dtype="fp32"))
    (workdir / "config" / "anyway.yaml").write_text("plan:\n  check_free_space: false\n")
    (workdir / "results").mkdir()
    command = [*prefix, "sh", "-c", SMALL_DISK_SCRIPT, *snakemake_argv(*LOCAL_RUN)]
    subprocess.run(command, cwd=workdir, timeout=RUN_TIMEOUT_S, check=True)

    refused = (workdir / "refused.out").read_text()
    assert (workdir / "refused.rc").read_text().strip() != "0", refused[-6000:]
    jobs = jobs_run(refused)
    assert {"tokenize", "plan"} <= jobs and not jobs & (every_shard() | {"target_embeddings"}), jobs
    message = next(line for line in refused.splitlines() if "the cache needs" in line)
    assert "runs.tiny.target_probs_topk: 64" in message and "plan.check_free_space: false" in message
    assert message in (workdir / "refused-plan.log").read_text()
    assert (workdir / "cache-files.txt").read_text() == ""

    assert (workdir / "anyway.rc").read_text().strip() == "0", (workdir / "anyway.out").read_text()[-6000:]
    plan = json.loads((workdir / "anyway-plan.json").read_text())
    assert not plan["fits"] and plan["required_bytes"] > plan["filesystem"]["free_bytes"]
    assert "the cache does not fit" in (workdir / "anyway.out").read_text()

    full = (workdir / "full.out").read_text()
    assert (workdir / "full.rc").read_text().strip() != "0", full[-6000:]
    last = full.strip().splitlines()[-6:]
    filled = next((line for line in last if line.startswith("Error: No space left on device while writing")), None)
    assert filled is not None, full[-6000:]
    assert f"the filesystem mounted at {workdir.resolve() / 'results'} has" in filled
    assert "Nothing this job wrote was committed" in filled
    assert "Traceback" not in full
    left = (workdir / "full-cache-files.txt").read_text().split()
    assert not any(name.endswith((MANIFEST_FILE, ".tmp")) for name in left), left


def negate_first_tensor_in_place(weights: Path) -> None:
    """Flip the sign bit of every value of the file's first tensor, writing into the file as it is."""
    header_bytes = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8 : 8 + header_bytes])
    name = next(name for name in sorted(header) if name != "__metadata__")
    start, end = (8 + header_bytes + offset for offset in header[name]["data_offsets"])
    width = {"F32": 4, "BF16": 2, "F16": 2}[header[name]["dtype"]]
    with open(weights, "r+b") as handle:
        handle.seek(start)
        values = bytearray(handle.read(end - start))
        for index in range(width - 1, len(values), width):
            values[index] ^= 0x80
        handle.seek(start)
        handle.write(values)


@pytest.mark.slow
def test_10_data_and_weights_rewritten_in_place_rerun_what_they_shape(tmp_path, tiny_chat_target):
    """A folder of Parquet files and a model folder, each rewritten in place (same names, sizes and
    inodes; the folders' timestamps do not move): tokenization reruns for the data, and only what the
    target computes for the weights."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = Path(shutil.copytree(tiny_chat_target, tmp_path / "model"))
    (tmp_path / "workdir").mkdir()
    workdir = new_workdir(tmp_path / "workdir", run_config(model, input_data="data/parquet"))
    parts = workdir / "data" / "parquet"
    parts.mkdir()
    rows = [json.loads(line) for line in (workdir / "data" / "conversations.jsonl").read_text().splitlines()]
    for index, part in enumerate((rows[::2], rows[1::2])):
        pq.write_table(pa.Table.from_pylist(part), parts / f"part-{index}.parquet")
    snakemake(workdir)
    manifest = json.loads((cache_dir(workdir) / "manifest.json").read_text())

    folder_mtime = parts.stat().st_mtime_ns
    answers = [{**row, "messages": [row["messages"][0], {"role": "assistant", "content": "other"}]} for row in rows]
    with open(parts / "part-1.parquet", "r+b") as handle:
        handle.truncate(0)
        pq.write_table(pa.Table.from_pylist(answers[1::2]), handle)
    assert parts.stat().st_mtime_ns == folder_mtime
    jobs = jobs_run(snakemake(workdir).stdout)
    assert TOKENIZATION | {"select_vocab", "plan"} | AFTER_SHARDS | every_shard() <= jobs
    rerun = json.loads((cache_dir(workdir) / "manifest.json").read_text())
    assert rerun["input_sha256"]["data_sha256"] != manifest["input_sha256"]["data_sha256"]

    weights = next(model.glob("*.safetensors"))
    before = digest(shard_path(workdir, 0)), weights.stat().st_ino
    negate_first_tensor_in_place(weights)
    assert weights.stat().st_ino == before[1]
    jobs = jobs_run(snakemake(workdir).stdout)
    assert jobs == {"target_embeddings"} | AFTER_SHARDS | every_shard()
    assert digest(shard_path(workdir, 0)) != before[0]
    assert jobs_run(snakemake(workdir).stdout) == set()


@pytest.mark.slow
def test_9_a_bare_snakemake_after_a_code_only_edit_plans_nothing(workdir):
    for script in (workdir / "workflow" / "scripts").glob("*.py"):
        script.write_text(script.read_text() + "# An edit that changes no result.\n")
    result = snakemake_static(workdir, "-n")
    assert result.returncode == 0, result.stdout
    assert jobs_run(result.stdout) == set()
    assert "Nothing to be done" in result.stdout


# --- Static checks (a dry run each) ---------------------------------------------------------


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["profiles/local", "profiles/slurm"])
def test_dry_run_before_tokenization_plans_up_to_the_checkpoint(tmp_path, profile):
    workdir = new_workdir(tmp_path, run_config(HUB_MODEL))
    result = snakemake_static(workdir, "--profile", profile, "-n")
    assert result.returncode == 0, result.stdout
    assert jobs_run(result.stdout) == {
        "index_conversations",
        "tokenize",
        "select_vocab",
        "plan",
        "target_embeddings",
        "manifest",
        "parity",
        "validate",
    }


@pytest.mark.slow
def test_demo_dry_run_converts_the_model_first(tmp_path):
    workdir = new_workdir(tmp_path, {})
    shutil.copytree(REPO / "config", workdir / "config", dirs_exist_ok=True)
    result = snakemake_static(workdir, "-n")
    assert result.returncode == 0, result.stdout
    assert "convert_demo_model" in jobs_run(result.stdout)


def test_conda_env_records_the_requirements_it_installs():
    env_file = (REPO / "envs" / "eagle3-cache.yaml").read_text()
    requirements = (REPO / "envs" / "requirements.txt").read_bytes()
    recorded = re.search(r"requirements.txt sha256: (\w+)", env_file).group(1)
    assert recorded == hashlib.sha256(requirements).hexdigest(), (
        "envs/requirements.txt changed: update its sha256 in envs/eagle3-cache.yaml"
    )
