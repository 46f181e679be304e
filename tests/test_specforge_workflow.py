"""The specforge format end to end, through the `snakemake` command line, on a tiny random model.

As in test_workflow.py: one completed run per session (`specforge_run`), and each test works on its own copy of it.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from eagle3_cache import startup
from eagle3_cache.cache_dir import check_cache
from eagle3_cache.errors import CacheConfigError, error_line
from eagle3_cache.layout import MANIFEST_FILE, VOCAB_MAPPING_FILE, shard_dir_name
from eagle3_cache.specforge_verification import check_specforge_cache
from helpers import (
    AFTER_SHARDS,
    CONFIG_SCHEMA,
    HUB_MODEL,
    NUM_SHARDS,
    RUN,
    TOKENIZATION,
    cache_dir,
    every_shard,
    jobs_run,
    kill_shard_writer_mid_write,
    new_workdir,
    private_copy,
    run_config,
    shard_jobs,
    snakemake,
    snakemake_static,
    write_config,
)

SPECFORGE_SHARD_RULES = ("compute_specforge_shard", "verify_shard")


def every_specforge_shard(count: int = NUM_SHARDS) -> set[str]:
    return every_shard(count, SPECFORGE_SHARD_RULES)


def shard_dir(workdir: Path, index: int) -> Path:
    return cache_dir(workdir) / shard_dir_name(index)


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def assert_complete_specforge_cache(workdir: Path) -> None:
    """Exactly the shard directories, mapping and manifest, all checks passing, report written."""
    expected = {shard_dir_name(index) for index in range(NUM_SHARDS)} | {MANIFEST_FILE, VOCAB_MAPPING_FILE}
    assert {path.name for path in cache_dir(workdir).iterdir()} == expected
    assert check_specforge_cache(cache_dir(workdir)) == []
    assert not (workdir / "results" / RUN / "shards.staging").exists()
    report = json.loads((workdir / "results" / RUN / "validation.json").read_text())
    failed = set(report["failed_checks"])
    # A random model's predictions cover little of a small draft vocabulary; that is all that may fail.
    assert failed <= {"Draft vocabulary"}, report["failed_checks"]


@pytest.mark.parametrize(("setting", "value"), [("dtype", "fp32"), ("target_probs_topk", 8)])
def test_settings_the_format_cannot_store_are_config_errors(tmp_path, monkeypatch, setting, value):
    config = run_config(HUB_MODEL, format="specforge", **{setting: value})
    monkeypatch.chdir(new_workdir(tmp_path, config))
    with pytest.raises(CacheConfigError) as refused:
        startup.checked_config(config, CONFIG_SCHEMA)
    line = error_line(refused.value)
    assert line.startswith(f"Error: config runs.tiny.{setting}: ") and f"{value!r} is not" not in line
    assert "the specforge format stores" in line


@pytest.fixture(scope="session")
def specforge_run(tmp_path_factory, tiny_chat_target) -> tuple[Path, set[str]]:
    workdir = new_workdir(tmp_path_factory.mktemp("specforge"), run_config(tiny_chat_target, format="specforge"))
    return workdir, jobs_run(snakemake(workdir).stdout)


@pytest.fixture
def workdir(specforge_run, tmp_path) -> Path:
    return private_copy(specforge_run[0], tmp_path)


@pytest.mark.slow
def test_first_run_builds_every_step(specforge_run):
    workdir, jobs = specforge_run
    assert jobs == TOKENIZATION | {"select_vocab", "plan", "specforge_vocab_mapping"} | AFTER_SHARDS | (
        every_specforge_shard()
    )
    assert_complete_specforge_cache(workdir)


@pytest.mark.slow
def test_1_second_run_does_nothing(workdir):
    result = snakemake(workdir)
    assert jobs_run(result.stdout) == set()


@pytest.mark.slow
def test_2_format_reruns_shards_manifest_and_report_only(workdir, tiny_chat_target):
    write_config(workdir, run_config(tiny_chat_target, format="automodel"))
    jobs = jobs_run(snakemake(workdir).stdout)
    # The plan sizes the format's files, so it is made again.
    assert jobs == {"plan", "target_embeddings"} | AFTER_SHARDS | every_shard()
    assert check_cache(cache_dir(workdir)) == []
    write_config(workdir, run_config(tiny_chat_target, format="specforge"))
    jobs = jobs_run(snakemake(workdir).stdout)
    assert jobs == {"plan", "specforge_vocab_mapping"} | AFTER_SHARDS | every_specforge_shard()
    assert_complete_specforge_cache(workdir)


@pytest.mark.slow
def test_the_plan_sizes_the_specforge_files_and_comes_before_every_shard(workdir):
    plan = json.loads((workdir / "results" / "tiny" / "plan.json").read_text())
    files = [cache_dir(workdir) / f["file"] for f in plan["files"]]
    sample_files = [p for path in files for p in ([*path.iterdir()] if path.is_dir() else [path])]
    assert plan["format"] == "specforge" and plan["apparent_bytes"] == sum(p.stat().st_size for p in sample_files)
    allocated = sum(p.stat().st_blocks * 512 for p in sample_files)
    assert abs(allocated / plan["allocated_bytes"] - 1) <= 0.01, (allocated, plan["allocated_bytes"])
    result = snakemake_static(workdir, "--rulegraph")
    assert result.returncode == 0, result.stdout
    ids = dict(re.findall(r"^\s*(\d+)\[label = \"(\w+)\"", result.stdout, re.MULTILINE))
    edges = {(ids[a], ids[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)$", result.stdout, re.MULTILINE)}
    assert ("plan", "compute_specforge_shard") in edges


@pytest.mark.slow
def test_3_forced_shard_is_recomputed_with_identical_bytes(workdir):
    target = shard_dir(workdir, 1)
    before = file_bytes(target), target.stat().st_mtime_ns
    result = snakemake(workdir, str(target.relative_to(workdir)), "--force")
    assert jobs_run(result.stdout) == {"compute_specforge_shard-000001"}
    assert target.stat().st_mtime_ns != before[1]
    assert file_bytes(target) == before[0]


@pytest.mark.slow
def test_4_killed_shard_job_leaves_no_directory_and_the_next_run_completes(workdir, specforge_run, tmp_path):
    shutil.rmtree(shard_dir(workdir, 1))
    killed = kill_shard_writer_mid_write(workdir, tmp_path / "hook", destination="shards/shard-000001")
    assert killed.returncode != 0, killed.stdout[-6000:]
    assert not shard_dir(workdir, 1).exists()
    result = snakemake(workdir, check=False)
    if "--rerun-incomplete" in result.stdout:
        result = snakemake(workdir, "--rerun-incomplete")
    assert result.returncode == 0, result.stdout[-6000:]
    assert jobs_run(result.stdout) == shard_jobs(1, rules=SPECFORGE_SHARD_RULES) | AFTER_SHARDS
    assert_complete_specforge_cache(workdir)
    assert file_bytes(shard_dir(workdir, 1)) == file_bytes(shard_dir(specforge_run[0], 1))


@pytest.mark.slow
def test_5_a_flipped_bit_in_a_sample_file_is_reported_taken_out_and_rebuilt(workdir, specforge_run):
    sample = sorted(shard_dir(workdir, 2).glob("*.ckpt"))[1]
    data = bytearray(sample.read_bytes())
    data[len(data) // 2] ^= 0x10
    sample.write_bytes(bytes(data))
    # Only a run that verifies again can see it: the scrub.
    reported = snakemake(workdir, "--forcerun", "verify_shard", check=False)
    assert reported.returncode != 0
    assert f"{shard_dir_name(2)}: failed verification: {sample.name}: digest differs" in reported.stdout
    assert not shard_dir(workdir, 2).exists() and not (cache_dir(workdir) / MANIFEST_FILE).exists()
    assert not (workdir / "results" / RUN / "validation.json").exists()

    assert jobs_run(snakemake(workdir).stdout) == shard_jobs(2, rules=SPECFORGE_SHARD_RULES) | AFTER_SHARDS
    assert file_bytes(shard_dir(workdir, 2)) == file_bytes(shard_dir(specforge_run[0], 2))
    assert_complete_specforge_cache(workdir)


@pytest.mark.slow
def test_6_a_deleted_vocabulary_mapping_is_remade_with_the_report_as_target(workdir):
    (cache_dir(workdir) / VOCAB_MAPPING_FILE).unlink()
    result = snakemake(workdir, f"results/{RUN}/validation_report.html")
    assert jobs_run(result.stdout) == {"specforge_vocab_mapping", "manifest", "validate"}
    assert_complete_specforge_cache(workdir)
