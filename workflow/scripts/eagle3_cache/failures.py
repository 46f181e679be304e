"""What a failed run says last: each failed job's one-line error again, naming its log, below Snakemake's
job tables where the eye lands. No torch: the Snakefile's `onerror` handler calls it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

# Snakemake's report of a failed job in its own log, and the job's log file in it.
FAILED_JOB = re.compile(r"^Error in rule (\S+):$")
JOB_LOG = re.compile(r"^\s+log: (.+?)(?: \(check log file\(s\) for error details\))?$")
# An ERROR record of a rule script's log (logs.FORMAT): time, level, logger, message.
ERROR_RECORD = re.compile(r"^\S+ \S+ ERROR [\w.]+: (.+)$")


def failed_jobs(snakemake_log: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """Each failed job Snakemake's log reports: its rule and its log files."""
    failed: list[tuple[str, list[str]]] = []
    for line in Path(snakemake_log).read_text(errors="replace").splitlines():
        if match := FAILED_JOB.match(line):
            failed.append((match.group(1), []))
        elif failed and (match := JOB_LOG.match(line)):
            failed[-1][1].extend(path.strip() for path in match.group(1).split(","))
    return failed


def job_error(job_log: str | os.PathLike) -> str | None:
    """The last error a rule script logged (what it printed as its `Error:` line); None for none."""
    try:
        lines = Path(job_log).read_text(errors="replace").splitlines()
    except OSError:
        return None
    errors = [match.group(1) for line in lines if (match := ERROR_RECORD.match(line))]
    return errors[-1] if errors else None


def failure_lines(snakemake_logs: Iterable[str | os.PathLike]) -> list[str]:
    """One line per failed job in Snakemake's logs (its `onerror` handler's `log`), its error and its log,
    each once."""
    lines = []
    jobs = [job for snakemake_log in snakemake_logs for job in failed_jobs(snakemake_log)]
    for rule, logs in jobs:
        named = ", ".join(logs) or "no log"
        message = next(filter(None, map(job_error, logs)), None)
        line = f"Error: {message} (rule {rule}; log {named})" if message else f"Error: rule {rule} failed; see {named}"
        if line not in lines:
            lines.append(line)
    return lines
