"""Measurements: of a run from inside (peak and current RSS, wall and CPU time, throughput), and of a
command with every process it starts, from outside."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

MIB = 1 << 20
# How often the process tree's resident memory is summed while a command runs.
TREE_SAMPLE_S = 0.1


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


@dataclass
class CommandCost:
    """What a command cost, with every process it started."""

    wall: float
    cpu: float  # user + system seconds of the command and of every descendant it waited for
    max_rss_mib: float  # the largest single process's peak (ru_maxrss over the tree)
    tree_rss_mib: float  # the largest sum over the live process tree, sampled every TREE_SAMPLE_S
    returncode: int


def tree_rss_mib(root: psutil.Process) -> float:
    """Resident memory of `root` and all its descendants now (processes ending meanwhile count as 0)."""
    total = 0
    with contextlib.suppress(psutil.Error):
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss
    return total / MIB


class TreeRssPeak:
    """The peak of `tree_rss_mib(pid)`, sampled on a thread until `stop()`."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.peak = 0.0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="tree-rss", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, tree_rss_mib(self.root))
            self.stopped.wait(TREE_SAMPLE_S)

    def stop(self) -> float:
        self.stopped.set()
        self.thread.join()
        return self.peak


def measured_command(
    command: Sequence[str], cwd: Path, log_path: Path, env: dict[str, str] | None = None
) -> CommandCost:
    """Run `command` to its end, output to `log_path`; its wall time, and CPU time and peak RSS of its tree.

    wait4 reports the command's own usage plus that of every descendant it waited for, so CPU time
    and ru_maxrss cover the jobs Snakemake starts; the tree's summed RSS is sampled meanwhile.
    """
    with open(log_path, "w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        sampler = TreeRssPeak(process.pid)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
    return CommandCost(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        max_rss_mib=usage.ru_maxrss / 1024,
        # A sample can miss the moment one process peaks; the tree then held at least that process.
        tree_rss_mib=max(sampler.stop(), usage.ru_maxrss / 1024),
        returncode=process.returncode,
    )


def log_tail(path: Path, lines: int = 30) -> str:
    """The last `lines` lines of a log file."""
    return "".join(path.read_text().splitlines(keepends=True)[-lines:])
