"""Logging for rule scripts: one file per job (Snakemake's `log:`) plus stderr, and the job's wall split."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(log_path: str | None = None) -> logging.Logger:
    """Route the package's log records to `log_path` (when given) and to stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format=FORMAT, handlers=handlers, force=True)
    return logging.getLogger("eagle3_cache")


def process_age_seconds() -> float | None:
    """Seconds since the kernel started this process (10 ms resolution), or None where /proc is absent.

    Read from /proc/self/stat, so it counts everything before the caller: the interpreter's start,
    Snakemake's script preamble and every import, which a clock started inside the script would miss.
    """
    try:
        stat = Path("/proc/self/stat").read_text()
    except OSError:
        return None
    # Field 22, starttime, in clock ticks since boot; fields are counted after the parenthesised name.
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def logged_wall_split(log: logging.Logger) -> Iterator[None]:
    """Log how long the process took to get here (imports) and how long the block took (work).

    Enter it right after the script's imports, around everything else the script does. What the
    package imports only on first use (transformers' model classes) counts as work.
    """
    startup = process_age_seconds()
    started = time.monotonic()
    try:
        yield
    finally:
        work, peak = time.monotonic() - started, peak_rss_mb()
        if startup is None:
            log.info("work %.2fs, peak RSS %.0f MB (process start unknown: no /proc on this system)", work, peak)
        else:
            log.info("started %.2fs after process start (imports), work %.2fs, peak RSS %.0f MB", startup, work, peak)


def peak_rss_mb() -> float:
    """The most resident memory this process has held, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
