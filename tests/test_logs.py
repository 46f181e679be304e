"""A job's log splits its wall time into process start and imports against the work itself."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eagle3_cache import logs
from eagle3_cache.logs import logged_wall_split
from helpers import RUN

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
WALL_SPLIT = re.compile(
    r" started \d+\.\d\ds after process start \(imports\), work \d+\.\d\ds, peak RSS \d+ MB$", re.MULTILINE
)


def test_the_process_age_counts_what_ran_before_the_script(tmp_path):
    # A child that sleeps before asking, as if importing: the half second shows in its age.
    probe = "import time; time.sleep(0.5); from eagle3_cache import logs; print(logs.process_age_seconds())"
    started = time.monotonic()
    output = subprocess.run(
        [sys.executable, "-c", probe], env={"PYTHONPATH": str(SCRIPTS)}, capture_output=True, text=True, check=True
    )
    age = float(output.stdout)
    assert 0.5 <= age <= time.monotonic() - started + 0.02  # /proc's start time has a 10 ms resolution


def test_the_wall_split_is_logged_even_when_the_work_fails(caplog):
    log = logging.getLogger("eagle3_cache.test")
    with caplog.at_level(logging.INFO, logger="eagle3_cache"), pytest.raises(RuntimeError):
        with logged_wall_split(log):
            time.sleep(0.05)
            raise RuntimeError("the work failed")
    pattern = r"started (\d+\.\d\d)s after process start \(imports\), work (\d+\.\d\d)s, peak RSS (\d+) MB"
    match = re.fullmatch(pattern, caplog.messages[-1])
    assert match and float(match[1]) > 0 and float(match[2]) >= 0.05 and int(match[3]) > 10


def test_without_proc_the_split_says_what_it_cannot_tell(caplog, monkeypatch):
    monkeypatch.setattr(logs, "process_age_seconds", lambda: None)
    with caplog.at_level(logging.INFO, logger="eagle3_cache"):
        with logged_wall_split(logging.getLogger("eagle3_cache.test")):
            pass
    assert re.match(r"work 0\.00s, peak RSS \d+ MB \(process start unknown", caplog.messages[-1])


@pytest.mark.slow
def test_every_job_of_a_run_logs_its_wall_split(completed):
    workdir, jobs = completed
    log_dir = workdir / "logs"
    job_logs = {path.relative_to(log_dir).as_posix(): path for path in log_dir.rglob("*.log")}
    assert set(job_logs) == {f"{RUN}/{job}.log" for job in jobs}
    without = {name for name, path in job_logs.items() if not WALL_SPLIT.search(path.read_text())}
    assert not without, f"logs without the wall split line: {sorted(without)}"


def test_every_rule_script_logs_its_wall_split():
    # The demo model's conversion and the specforge rules do not run in `completed`: their scripts are read.
    scripts = {path.name for path in SCRIPTS.glob("*.py")}
    without = {name for name in scripts if "logged_wall_split(log)" not in (SCRIPTS / name).read_text()}
    assert not without, f"rule scripts without the wall split: {sorted(without)}"
