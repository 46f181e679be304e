"""The exception types for what a user must fix or rebuild, and how a job reports them."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator


class CacheConfigError(ValueError):
    """A setting, file or sample the user must change; the message says which and how."""


class ShardScanError(RuntimeError):
    """A shard's rows fail the numeric scan; the message names the shard, the field and the first sample."""


def error_line(message: object) -> str:
    """What a run stopped by a user's error prints: `Error: ` and the message, on one line."""
    return "Error: " + " ".join(str(message).split())


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Around a rule script's work: a CacheConfigError ends the job (exit status 1) with its message as one
    line on stderr, the first the user reads about it, and its traceback only in the job's log file."""
    try:
        yield
    except CacheConfigError as error:
        logger = logging.getLogger(__name__)
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, str(error), (), sys.exc_info())
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        sys.exit(error_line(error))


@contextlib.contextmanager
def stopping_on_config_errors() -> Iterator[None]:
    """Around the Snakefile's own checks: a CacheConfigError ends Snakemake with its message as the one line
    it prints, and no traceback."""
    try:
        yield
    except CacheConfigError as error:
        sys.exit(error_line(error))
