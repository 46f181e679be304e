"""Crash safety and repair, through the `snakemake` command line on the tiny workflow.

A rebuild killed at any point never leaves a manifest beside shards it does not describe; a deleted
cache file is remade whatever the target; a damaged shard is reported, taken out and rebuilt. Each
test works on its own copy of the completed run (the `workdir` fixture).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from eagle3_cache.cache_dir import check_cache
from eagle3_cache.layout import EMBEDDINGS_FILE, MANIFEST_FILE, VALIDATION_JSON
from eagle3_cache.provenance import ids_fingerprint
from eagle3_cache.sparse_digest import file_digest
from helpers import (
    AFTER_SHARDS,
    LOCAL_RUN,
    NUM_CONVERSATIONS,
    NUM_SHARDS,
    RUN,
    cache_dir,
    conversation,
    digest,
    every_shard,
    jobs_run,
    run_config,
    shard_jobs,
    shard_path,
    snakemake,
    snakemake_argv,
    write_config,
)

pytestmark = pytest.mark.slow

KILL_TRIALS = 10
KILL_SEED = 20260
# Kills "by time" land anywhere in this many seconds after the start; on a 2-core machine a full
# rebuild of the tiny run takes about as long, so some land before the shards, some among them, some after.
KILL_WITHIN_S = 25.0
# Smaller shards than the other tests', so that a rebuild has five: with two shard jobs at a time, a kill
# after the k-th new shard still finds old shards waiting their turn.
KILL_SHARD_SIZE = 2
KILL_NUM_SHARDS = -(-NUM_CONVERSATIONS // KILL_SHARD_SIZE)
# Unattended trials end after this long even if the awaited shard never appears.
TRIAL_TIMEOUT_S = 300.0


def run_dir(workdir: Path) -> Path:
    return workdir / "results" / RUN


def report_checks(workdir: Path) -> dict[str, bool]:
    """Each check of the run's report: passed or not."""
    report = json.loads((run_dir(workdir) / VALIDATION_JSON).read_text())
    return {check["key"]: check["passed"] for check in report["checks"]}


def assert_whole(workdir: Path, num_shards: int = NUM_SHARDS) -> None:
    """Exactly the cache files, intact, committed; and, if there is a report, it finds the cache whole."""
    names = {path.name for path in cache_dir(workdir).iterdir()}
    assert names == {shard_path(workdir, i).name for i in range(num_shards)} | {MANIFEST_FILE, EMBEDDINGS_FILE}
    assert check_cache(cache_dir(workdir)) == []
    if (run_dir(workdir) / VALIDATION_JSON).exists():
        checks = report_checks(workdir)
        assert checks["integrity"] and checks["sanity"] and checks["parity"], checks


# --- Deleted and damaged files ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("deleted", "target", "reran"),
    [
        (MANIFEST_FILE, "report", {"manifest", "validate"}),
        (EMBEDDINGS_FILE, None, {"target_embeddings", "manifest", "validate"}),
        ("shard-000002.safetensors", "report", shard_jobs(2) | AFTER_SHARDS),
        ("shard-000000.safetensors", "manifest", shard_jobs(0) | {"manifest"}),
    ],
    ids=["manifest-report", "embeddings-default", "shard-report", "shard-manifest"],
)
def test_a_deleted_cache_file_is_remade_whatever_the_target(workdir, deleted, target, reran):
    targets = {
        None: [],
        "report": [f"results/{RUN}/validation_report.html"],
        "manifest": [f"results/{RUN}/shards/{MANIFEST_FILE}"],
    }[target]
    shards = {i: digest(shard_path(workdir, i)) for i in range(NUM_SHARDS)}
    (cache_dir(workdir) / deleted).unlink()
    assert jobs_run(snakemake(workdir, *targets).stdout) == reran
    assert_whole(workdir)
    assert {i: digest(shard_path(workdir, i)) for i in range(NUM_SHARDS)} == shards


def test_a_truncated_shard_is_reported_taken_out_and_rebuilt(workdir):
    shard = shard_path(workdir, 1)
    original = digest(shard)
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)

    reported = snakemake(workdir, check=False)
    assert reported.returncode != 0
    assert f"{shard.name}: failed verification" in reported.stdout and "run the workflow again" in reported.stdout
    assert not shard.exists() and not (cache_dir(workdir) / MANIFEST_FILE).exists()
    assert not (run_dir(workdir) / VALIDATION_JSON).exists()

    assert jobs_run(snakemake(workdir).stdout) == shard_jobs(1) | AFTER_SHARDS
    assert digest(shard) == original
    assert_whole(workdir)


def damaged_in_place(path: Path, how: str) -> None:
    """Truncated, or its middle bytes overwritten (same size), as a failing disk or a stray write leaves it."""
    with open(path, "r+b") as handle:
        if how == "truncated":
            handle.truncate(path.stat().st_size // 2)
        else:
            handle.seek(path.stat().st_size // 2)
            handle.write(b"\xff" * 16)


@pytest.mark.parametrize(
    ("damaged", "rebuilt"),
    [
        ({"vocab_selection.pt": "overwritten"}, {"select_vocab"}),
        ({"tokenized.h5": "truncated", "plan.json": "truncated"}, {"tokenize", "plan"}),
    ],
    ids=["vocab-selection", "tokenized-and-plan"],
)
def test_a_damaged_product_is_rebuilt_alone_and_costs_no_finished_shard(workdir, damaged, rebuilt):
    """Found as the workflow starts, set aside, rebuilt alone; rebuilt identical, it gets its first mtime
    back, so the next plain run has nothing to do: every shard kept, same file, same mtime."""
    shards = [shard_path(workdir, i) for i in range(NUM_SHARDS)]
    kept = [(path.stat().st_ino, path.stat().st_mtime_ns, digest(path)) for path in shards]
    for name, how in damaged.items():
        damaged_in_place(run_dir(workdir) / name, how)

    first = snakemake(workdir)
    assert jobs_run(first.stdout) == rebuilt
    for name in damaged:
        assert f"results/{RUN}/{name} is damaged" in first.stdout
        assert (run_dir(workdir) / f"{name}.damaged").exists()
    assert "Run the workflow again to go on" in first.stdout
    second = snakemake(workdir)
    assert jobs_run(second.stdout) == set(), second.stdout
    assert [(path.stat().st_ino, path.stat().st_mtime_ns, digest(path)) for path in shards] == kept
    assert_whole(workdir)


def test_the_scrub_reverifies_every_shard_and_recommits(workdir):
    jobs = jobs_run(snakemake(workdir, "--forcerun", "verify_shard", "--dry-run").stdout)
    assert jobs == every_shard(rules=("verify_shard",)) | {"manifest", "validate"}


# --- Interrupted rebuilds ---------------------------------------------------------------------


def manifest_over_other_shards(workdir: Path) -> list[str]:
    """What a trainer would misread now: present shards the manifest (if there is one) does not describe."""
    path = cache_dir(workdir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    records = {record["file"]: record for record in manifest["shards"]}
    vocabulary = ids_fingerprint(manifest["selected_token_ids"])
    problems = []
    for shard in sorted(cache_dir(workdir).glob("shard-*.safetensors")):
        record = records.get(shard.name)
        if record is None or file_digest(shard) != record["digest"]:
            problems.append(f"{shard.name} is not the shard the manifest records")
            continue
        stats = run_dir(workdir) / "shard_stats" / shard.with_suffix(".json").name
        if stats.exists():
            recorded = json.loads(stats.read_text())
            if recorded["digest"] == record["digest"] and recorded["selected_token_ids_sha256"] != vocabulary:
                problems.append(f"{shard.name} was computed with another draft vocabulary than the manifest's")
    return problems


def shard_identities(workdir: Path) -> dict[str, tuple[int, int]]:
    """Each present shard's inode and mtime: a shard rewritten since has other ones."""
    return {
        path.name: (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in cache_dir(workdir).glob("shard-*.safetensors")
    }


def change_config(workdir: Path, tiny_chat_target: Path, trial: int, rng: random.Random) -> str:
    """A change that reruns every shard: another draft vocabulary size, or other conversations."""
    if rng.random() < 0.5:
        current = yaml.safe_load((workdir / "config" / "config.yaml").read_text())["runs"][RUN]["draft_vocab_size"]
        size = rng.choice([size for size in (40, 48, 56, 64) if size != current])
        write_config(workdir, run_config(tiny_chat_target, draft_vocab_size=size, shard_size=KILL_SHARD_SIZE))
        return f"draft_vocab_size {size}"
    lines = [json.dumps(conversation(index + 7 * (trial + 1))) for index in range(NUM_CONVERSATIONS)]
    (workdir / "data" / "conversations.jsonl").write_text("\n".join(lines) + "\n")
    return "other conversations"


def kill_rebuild(workdir: Path, when: str, rng: random.Random, log: Path) -> str:
    """Start the workflow and SIGKILL it with all its jobs at once: after a random delay, or just after the
    k-th shard of this rebuild appears (k random). Returns where the kill landed."""
    before = shard_identities(workdir)
    delay, k = rng.uniform(0, KILL_WITHIN_S), rng.randint(1, KILL_NUM_SHARDS - 2)
    with open(log, "w") as output:
        run = subprocess.Popen(
            snakemake_argv(*LOCAL_RUN, "--nolock", "--rerun-incomplete"),
            cwd=workdir,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = time.monotonic()
    try:
        while run.poll() is None and time.monotonic() - started < TRIAL_TIMEOUT_S:
            if when == "time" and time.monotonic() - started >= delay:
                break
            new = [name for name, identity in shard_identities(workdir).items() if before.get(name) != identity]
            if when == "shard" and len(new) >= k:
                break
            time.sleep(0.05)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    elapsed = time.monotonic() - started
    # SIGKILL is final, but a process in a system call finishes it first: let any rename land.
    time.sleep(0.5)
    return f"{when} kill after {elapsed:.1f}s (delay {delay:.1f}s, k {k}), exit {run.returncode}"


def test_interrupted_rebuilds_never_leave_a_manifest_over_other_shards(workdir, tiny_chat_target, tmp_path):
    rng = random.Random(KILL_SEED)
    violations, mixed, outcomes = [], 0, []
    write_config(workdir, run_config(tiny_chat_target, shard_size=KILL_SHARD_SIZE))
    for trial in range(KILL_TRIALS):
        change = change_config(workdir, tiny_chat_target, trial, rng)
        before = shard_identities(workdir)
        landed = kill_rebuild(workdir, "time" if trial % 2 == 0 else "shard", rng, tmp_path / f"trial-{trial}.log")
        after = shard_identities(workdir)
        rewritten = sum(before.get(name) != identity for name, identity in after.items())
        mixed += 0 < rewritten < len(after)
        committed = (cache_dir(workdir) / MANIFEST_FILE).exists()
        outcomes.append(f"trial {trial}: {change}; {landed}; {rewritten}/{len(after)} shards new, manifest {committed}")
        violations += [f"trial {trial}: {problem}" for problem in manifest_over_other_shards(workdir)]
    print("\n" + "\n".join(outcomes))
    assert violations == [], "\n".join(outcomes + violations)
    assert mixed >= 3, "too few kills landed among the shards to test anything:\n" + "\n".join(outcomes)

    snakemake(workdir, "--rerun-incomplete")
    assert manifest_over_other_shards(workdir) == []
    assert_whole(workdir, KILL_NUM_SHARDS)
