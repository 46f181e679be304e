"""Progress a user can watch, read from a run's files: shards done under the current settings, verified,
bytes against the plan, committed; and the last run's failed jobs."""

import pytest
import yaml

from eagle3_cache.progress import checked_run_config, report
from helpers import NUM_SHARDS, RUN, write_config

pytestmark = pytest.mark.slow


def test_a_finished_run_is_done_verified_and_committed(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    [line] = report(checked_run_config(), now=0.0, window=600.0)
    assert line.startswith(f"{RUN}: {NUM_SHARDS}/{NUM_SHARDS} shards done, {NUM_SHARDS} verified; ")
    assert line.endswith("written; committed") and "ETA" not in line


def test_shards_of_other_settings_are_not_counted_and_failed_jobs_are_named(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    config["runs"][RUN]["compute_dtype"] = "bf16"
    write_config(workdir, config)
    log = workdir / "logs" / RUN / "compute_shard-000001.log"
    log.write_text("2026-12-08 00:00:00,000 ERROR eagle3_cache.errors: out of memory at batch 3\n")
    snakemake_log = workdir / ".snakemake" / "log" / "9999-12-31T000000.000000.snakemake.log"
    snakemake_log.write_text(f"Error in rule compute_shard:\n    log: {log} (check log file(s) for error details)\n")
    lines = report(checked_run_config(), now=0.0, window=600.0)
    assert lines[0].startswith(f"{RUN}: 0/{NUM_SHARDS} shards done, 0 verified; ")
    assert lines[1:] == [
        f"failed jobs in the last Snakemake run ({snakemake_log.relative_to(workdir)}):",
        f"  Error: out of memory at batch 3 (rule compute_shard; log {log})",
    ]
