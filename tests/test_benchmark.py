"""Smoke tests of the benchmark tool's machinery on a tiny model (nothing here is timed)."""

from __future__ import annotations

import json

import pytest

from eagle3_cache.errors import CacheConfigError
from helpers import PARITY_ROWS
from tools.benchmark.cli import main
from tools.benchmark.compare import LOAD_SHARE_TARGET


@pytest.fixture
def conversations(tmp_path):
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PARITY_ROWS * 2))
    return path


@pytest.mark.automodel
def test_compare_prints_the_table_and_the_parity_verdict(tiny_chat_target, conversations, tmp_path, capsys):
    pytest.importorskip(
        "nemo_automodel.components.speculative.precompute_eagle3",
        reason="nemo-automodel 0.7.0 is the benchmark's reference: "
        "pip install --no-deps -r envs/requirements-nodeps-oracle.txt",
    )
    report = main(
        [
            *("--model", str(tiny_chat_target), "--conversations", str(conversations)),
            *("--rounds", "1", "--num-samples", "6", "--shard-size", "4", "--batch-size", "2"),
            *("--seq-length", "48", "--draft-vocab-size", "64", "--device", "cpu", "--threads", "1"),
            *("--workdir", str(tmp_path / "work"), "--output-json", str(tmp_path / "report.json")),
        ]
    )
    out = capsys.readouterr().out
    for label in ("samples/s", "real tokens/s", "peak RSS (MiB)", "model load (s)", "parity (round 1): PASS"):
        assert label in out
    assert report["parity"]["identical"], report["parity"]["problems"]
    ours, reference = report["runs"]["ours"][0], report["runs"]["reference"][0]
    assert ours["samples"] == reference["samples"] == 6
    assert ours["real_tokens"] == reference["real_tokens"]
    overhead = json.loads((tmp_path / "report.json").read_text())["job_overhead"]
    assert overhead == report["job_overhead"]
    # The smallest shard sizes (multiples of the batch size 2) keep the overhead within its share of a job.
    load, startup = overhead["load_seconds"], overhead["startup_seconds"]
    rate = overhead["default_shard_size"] / (overhead["job_seconds"] - startup - load)
    for key, seconds in (("shard_size_for_load", load), ("shard_size_for_load_and_start", load + startup)):
        size = overhead[key]
        assert seconds / (seconds + size / rate) <= LOAD_SHARE_TARGET + 1e-9, key
        assert size == 2 or seconds / (seconds + (size - 2) / rate) > LOAD_SHARE_TARGET, key


def test_rss_scaling_runs_one_shard_at_two_sizes(tiny_chat_target, conversations, tmp_path, capsys):
    report = main(
        [
            *("--rss-scaling", "--model", str(tiny_chat_target), "--conversations", str(conversations)),
            *("--shard-size", "2", "--batch-size", "2", "--seq-length", "48", "--draft-vocab-size", "64"),
            *("--device", "cpu", "--threads", "1", "--workdir", str(tmp_path / "work")),
        ]
    )
    assert [run["samples"] for run in report["runs"].values()] == [2, 4]
    assert "peak RSS ratio 4 / 2" in capsys.readouterr().out


def test_gpu_floor_code_path_runs_on_a_tiny_cpu_model(tmp_path, capsys):
    report = main(
        ["--gpu-floor", "--tiny", "--num-samples", "8", "--threads", "1", "--workdir", str(tmp_path / "work")]
    )
    out = capsys.readouterr().out
    assert "of the floor" in out
    assert report["run"]["samples"] == 8
    assert report["flops"] > 2 * report["run"]["linear_params"] * report["run"]["real_tokens"]


def test_a_shard_size_the_reference_refuses_is_an_error():
    with pytest.raises(CacheConfigError, match="multiple of --batch-size"):
        main(["--shard-size", "6", "--batch-size", "4"])


@pytest.mark.slow
@pytest.mark.automodel
def test_workflow_mode_runs_snakemake_and_the_reference_cli_to_complete_caches(
    tiny_chat_target, conversations, tmp_path, capsys
):
    pytest.importorskip("nemo_automodel.components.speculative.precompute_eagle3")
    report = main(
        [
            *("--workflow", "--model", str(tiny_chat_target), "--conversations", str(conversations)),
            *("--rounds", "1", "--num-samples", "6", "--shard-size", "4", "--batch-size", "2"),
            *("--seq-length", "48", "--draft-vocab-size", "64", "--device", "cpu", "--cores", "2"),
            *("--workdir", str(tmp_path / "work")),
        ]
    )
    out = capsys.readouterr().out
    for label in ("wall to a complete cache (s)", "peak RSS, process tree (MiB)", "forward s / 1k positions"):
        assert label in out
    assert "parity of the round-1 caches: PASS" in out, out
    ours, reference = report["runs"]["ours"][0], report["runs"]["reference"][0]
    assert ours["samples"] == 6
    assert reference["positions"] == 6 * 48  # padded batches of 2 full rows
    assert 0 < ours["positions"] < reference["positions"]
    assert ours["fixed_cost"]["compute_shard"]["jobs"] == ours["fixed_cost"]["compute_shard"]["logged"] == 2
    for run in (ours, reference):
        assert run["cache"]["cpu"] > 0 and run["cache"]["tree_rss_mib"] >= run["cache"]["max_rss_mib"] > 0
