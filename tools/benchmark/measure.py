"""Measurements taken inside a run: peak and current RSS, wall and CPU time, throughput."""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

MIB = 1 << 20


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """This process's resident set size now."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def timed(work: Callable[[], Any]) -> tuple[Any, float]:
    """`work()` and the seconds it took."""
    started = time.perf_counter()
    value = work()
    return value, time.perf_counter() - started


@dataclass
class Elapsed:
    wall: float = 0.0
    cpu: float = 0.0  # user + system seconds of every thread of this process


@contextlib.contextmanager
def stopwatch() -> Iterator[Elapsed]:
    """Wall and CPU time of the block; CPU time is the steadier figure on a shared machine."""
    elapsed = Elapsed()
    wall, cpu = time.perf_counter(), time.process_time()
    yield elapsed
    elapsed.wall, elapsed.cpu = time.perf_counter() - wall, time.process_time() - cpu


def samples_per_s(run: dict) -> float:
    return run["samples"] / run["seconds"]


def tokens_per_s(run: dict) -> float:
    return run["real_tokens"] / run["seconds"]
