"""A failed run's last lines: each failed job's one-line error again, with its log."""

from eagle3_cache.failures import failure_lines

SNAKEMAKE_LOG = """\
[Tue Dec  8 00:11:53 2026]
Error in rule tokenize:
    message: None
    jobid: 3
    input: data/bad.jsonl
    output: results/tiny/tokenized.h5
    log: {tokenize_log} (check log file(s) for error details)
Error in rule compute_shard:
    jobid: 7
    log: {shard_log} (check log file(s) for error details)
Error in rule verify_shard:
    jobid: 9
Shutting down, this might take some time.
"""


def test_each_failed_job_gets_its_error_and_log_once(tmp_path):
    tokenize_log, shard_log = tmp_path / "tokenize.log", tmp_path / "shard.log"
    tokenize_log.write_text(
        "2026-12-08 00:11:53,170 INFO eagle3_cache: started 0.11s after process start\n"
        "2026-12-08 00:11:53,170 ERROR eagle3_cache.errors: data/bad.jsonl, line 2: `messages` must be a list\n"
        "Traceback (most recent call last):\n"
        "eagle3_cache.errors.CacheConfigError: data/bad.jsonl, line 2: `messages` must be a list\n"
    )
    shard_log.write_text("2026-12-08 00:11:53,170 INFO eagle3_cache: loaded\n")
    log = tmp_path / "snakemake.log"
    log.write_text(SNAKEMAKE_LOG.format(tokenize_log=tokenize_log, shard_log=shard_log))
    assert failure_lines([log, log]) == [
        f"Error: data/bad.jsonl, line 2: `messages` must be a list (rule tokenize; log {tokenize_log})",
        f"Error: rule compute_shard failed; see {shard_log}",
        "Error: rule verify_shard failed; see no log",
    ]
