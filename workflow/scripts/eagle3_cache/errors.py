"""The exception types for what a user must fix or rebuild, and how a job reports them."""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from .layout import RESULTS_DIR
from .units import format_bytes


class CacheConfigError(ValueError):
    """A setting, file or sample the user must change; the message says which and how."""


class ShardScanError(RuntimeError):
    """A shard's rows fail the numeric scan; the message names the shard, the field and the first sample."""


def error_line(message: object) -> str:
    """What a run stopped by a user's error prints: `Error: ` and the message, on one line."""
    return "Error: " + " ".join(str(message).split())


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# A file the job may not open as it must: a read-only filesystem, or permissions.
NO_ACCESS = (errno.EROFS, errno.EACCES, errno.EPERM)


def os_error(error: BaseException | None, errnos: tuple[int, ...]) -> OSError | None:
    """The OSError with one of `errnos` that `error` is or was raised from; None for another."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in errnos:
            return error
        error = error.__cause__ or error.__context__
    return None


def disk_full(error: BaseException) -> OSError | None:
    """The out-of-space (or over-quota) error that `error` is or was raised from; None for another."""
    return os_error(error, DISK_FULL)


def disk_full_message(error: OSError) -> str:
    """What a job that ran out of space says: the filesystem, its free space now, and that nothing was committed."""
    # Imported here: disk_space imports atomic, which imports this module.
    from .disk_space import mount_point

    written = Path(error.filename) if error.filename else Path(RESULTS_DIR)
    filesystem = mount_point(written.parent if error.filename else written)
    free = shutil.disk_usage(filesystem).free
    what = error.filename or "this job's outputs"
    return (
        f"{error.strerror} while writing {what}: the filesystem "
        f"mounted at {filesystem} has {format_bytes(free)} free. Nothing this job wrote was committed (an unfinished "
        "file is only ever a temp file, and it was removed); free space there, then run the workflow again."
    )


def user_error_message(error: Exception) -> str | None:
    """The one line for a failure the user must fix: a CacheConfigError, a disk that filled, a file the
    job may not open; None for another (a bug, which keeps its traceback)."""
    if isinstance(error, CacheConfigError):
        return str(error)
    if full := disk_full(error):
        return disk_full_message(full)
    denied = os_error(error, NO_ACCESS)
    if denied is not None and denied.filename:
        return (
            f"cannot open {denied.filename} ({denied.strerror}); make it readable, and {RESULTS_DIR}/ writable, "
            "for the user that runs the workflow"
        )
    return None


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Around a rule script's work: a failure the user must fix (`user_error_message`) ends the job (exit
    status 1) with one line on stderr, the first the user reads about it, and its traceback only in the
    job's log file."""
    try:
        yield
    except Exception as error:
        message = user_error_message(error)
        if message is None:
            raise
        logger = logging.getLogger(__name__)
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), sys.exc_info())
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        sys.exit(error_line(message))


@contextlib.contextmanager
def stopping_on_config_errors() -> Iterator[None]:
    """Around the Snakefile's own checks: a CacheConfigError ends Snakemake with its message as the one line
    it prints, and no traceback."""
    try:
        yield
    except CacheConfigError as error:
        sys.exit(error_line(error))
