"""A throw-away single-node SLURM cluster (Debian's SLURM 22.05) for the cluster tests.

`running_slurm_cluster()` starts munged, slurmctld and slurmd with every file in one
temporary directory (keys, sockets, state, logs, pid files), exposes four fake GPUs, and
on exit stops the daemons and removes the directory.  The only file it touches outside
that directory is /etc/slurm/slurm.conf (see `system_slurm_conf`), which it restores.

`require_slurm()` installs the Debian packages when they are missing and skips the calling
test when that is impossible -- or fails it when the environment variable CI is set, so
that CI never passes by silently skipping the cluster tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")
# Where the packages' maintainer scripts would leave a started daemon's pid.
PACKAGED_DAEMONS = {
    "munged": Path("/run/munge/munged.pid"),
    "slurmctld": Path("/run/slurmctld.pid"),
    "slurmd": Path("/run/slurmd.pid"),
}
# The executor plugin's nested `srun` drops every SLURM_* variable, SLURM_CONF included,
# so the client commands inside a job only find the cluster through the default path.
SYSTEM_SLURM_CONF = Path("/etc/slurm/slurm.conf")

PARTITION = "gpu"
NODE_CPUS = 8  # more than the machine has; `config_overrides` lets slurmd accept it
NODE_MEMORY_MB = 8000
NODE_GPUS = 4
# Finished jobs stay visible to `squeue` this long; the plugin's squeue status command
# needs at least 3x its `slurm-init-seconds-before-status-checks` (see profiles/slurm-test).
MIN_JOB_AGE_S = 300
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class SlurmCluster:
    """A running throw-away cluster; `env` points SLURM's client commands at it."""

    root: Path
    conf: Path
    partition: str
    gpus: int

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def slurmctld_log(self) -> Path:
        return self.root / "slurmctld.log"

    def run(self, *command: str) -> str:
        """Run a SLURM client command (sbatch, squeue, ...) and return its stdout."""
        return subprocess.run(command, env=self.env, check=True, capture_output=True, text=True).stdout

    def unfinished_job_ids(self) -> list[str]:
        """Jobs pending, running or completing."""
        return self.run("squeue", "--noheader", "--format=%i").split()


def slurm_unavailable_reason() -> str | None:
    """Why no cluster can be started here (None when it can), installing SLURM if needed."""
    if os.geteuid() != 0:
        return "the throw-away SLURM cluster runs slurmd as root; run the tests as root"
    if missing_programs():
        if shutil.which("apt-get") is None:
            return f"SLURM is not installed ({', '.join(missing_programs())} missing) and apt-get is unavailable"
        try:
            install_slurm_packages()
        except subprocess.CalledProcessError as error:
            return f"installing {' '.join(SLURM_PACKAGES)} with apt-get failed:\n{error.stderr}"
    if missing_programs():
        return f"SLURM programs still missing after installation: {', '.join(missing_programs())}"
    return None


def require_slurm() -> None:
    """Skip the calling test when no cluster can be started; fail it instead under CI."""
    reason = slurm_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the SLURM tests, but {reason}")
    pytest.skip(reason)


def missing_programs() -> list[str]:
    return [program for program in SLURM_PROGRAMS if shutil.which(program) is None]


def install_slurm_packages() -> None:
    """apt-get install the SLURM packages, then stop any daemon their scripts started."""
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *SLURM_PACKAGES]
    if subprocess.run(install, env=apt_env, capture_output=True).returncode != 0:
        # A fresh machine has no package lists yet.
        subprocess.run(["apt-get", "update"], env=apt_env, check=True, capture_output=True, text=True)
        subprocess.run(install, env=apt_env, check=True, capture_output=True, text=True)
    # The packaged daemons would run with the default config and compete for the ports.
    for program, pid_file in PACKAGED_DAEMONS.items():
        stop_daemon(pid_file, program)


@contextlib.contextmanager
def running_slurm_cluster() -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd; stop them, restore /etc and clean up on exit."""
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eagle3-slurm-")))
        # munged refuses a socket below a directory that not everyone may traverse.
        root.chmod(0o755)
        for subdir in ("munge", "state", "spool", "gpus"):
            (root / subdir).mkdir()
        conf = write_cluster_config(root)
        cluster = SlurmCluster(root=root, conf=conf, partition=PARTITION, gpus=NODE_GPUS)
        stack.enter_context(system_slurm_conf(conf))
        try:
            stack.enter_context(daemon(munged_command(root), root / "munged.pid"))
            stack.enter_context(daemon(["slurmctld", "-f", str(conf), "-c"], root / "slurmctld.pid"))
            stack.enter_context(daemon(["slurmd", "-f", str(conf), "-N", "localhost"], root / "slurmd.pid"))
            wait_for(lambda: node_state(cluster) == "idle", "the node to become idle")
        except (RuntimeError, TimeoutError) as error:
            # The directory, logs included, is gone once the exception leaves this block.
            raise RuntimeError(f"the SLURM test cluster did not start: {error}\n{daemon_logs(root)}") from error
        # Runs first on exit: a job's slurmstepd outlives a stopped slurmd.
        stack.callback(cancel_all_jobs, cluster)
        yield cluster


def write_cluster_config(root: Path) -> Path:
    """Write slurm.conf and gres.conf (and the fake GPU device files) under `root`."""
    gpu_files = root / "gpus"
    for index in range(NODE_GPUS):
        # SLURM only numbers a GPU (and sets CUDA_VISIBLE_DEVICES) for a device file;
        # a character device is all it checks, so /dev/null stands in for /dev/nvidiaN.
        (gpu_files / f"fakegpu{index}").symlink_to("/dev/null")
    (root / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={gpu_files}/fakegpu[0-{NODE_GPUS - 1}]\n")
    conf = root / "slurm.conf"
    controller_port, node_port = free_ports(2)
    conf.write_text(slurm_conf_text(root, controller_port, node_port))
    return conf


def slurm_conf_text(root: Path, controller_port: int, node_port: int) -> str:
    return f"""\
ClusterName=eagle3test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={controller_port}
SlurmdPort={node_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
MinJobAge={MIN_JOB_AGE_S}
DefMemPerCPU={NODE_MEMORY_MB // NODE_CPUS}
NodeName=localhost NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} Gres=gpu:{NODE_GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def free_ports(count: int) -> list[int]:
    """TCP ports nothing listens on now (a packaged or second cluster may hold 6817/6818)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


def munged_command(root: Path) -> list[str]:
    """Write a fresh munge key under `root`; the command line of a munged using it and its
    own socket, pid, log and seed files there."""
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    return [
        "munged",
        f"--key-file={key}",
        f"--socket={root}/munge/munge.socket",
        f"--pid-file={root}/munged.pid",
        f"--log-file={root}/munged.log",
        f"--seed-file={root}/munge/munged.seed",
    ]


def daemon_logs(root: Path, lines: int = 20) -> str:
    """The last `lines` lines of each daemon's log under `root`."""
    tails = []
    for log in sorted(root.glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(tails)


@contextlib.contextmanager
def daemon(command: list[str], pid_file: Path) -> Iterator[None]:
    """Run a self-daemonising program and stop it through its pid file on exit."""
    started = subprocess.run(command, capture_output=True, text=True)
    if started.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{started.stderr}")
    try:
        wait_for(pid_file.exists, f"{command[0]} to write {pid_file}")
        yield
    finally:
        stop_daemon(pid_file, command[0])


def stop_daemon(pid_file: Path, program: str) -> None:
    """SIGTERM `program` by the pid in `pid_file` and wait for it to exit; SIGKILL after 20 s.

    Does nothing when the file is missing or its pid now belongs to another program.
    """
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not process_alive(pid, program):
            return
        os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not process_alive(pid, program), f"{program} to exit", timeout_s=20)
            return


def process_alive(pid: int, program: str) -> bool:
    """Whether `pid` is a running (not zombie) process of `program`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    # /proc/PID/stat is "PID (COMM) STATE ..."; COMM is cut to 15 characters.
    command, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return command == program[:15] and state != "Z"


@contextlib.contextmanager
def system_slurm_conf(conf: Path) -> Iterator[None]:
    """Make /etc/slurm/slurm.conf a link to `conf`; put back what was there on exit."""
    backup = SYSTEM_SLURM_CONF.with_name("slurm.conf.eagle3-cache-test-backup")
    if backup.exists() or backup.is_symlink():
        raise RuntimeError(
            f"{backup} exists: an earlier SLURM test run did not finish (or one is running). "
            f"Move it back to {SYSTEM_SLURM_CONF} if no SLURM test is running, then rerun."
        )
    created_dir = not SYSTEM_SLURM_CONF.parent.exists()
    SYSTEM_SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    had_conf = SYSTEM_SLURM_CONF.exists() or SYSTEM_SLURM_CONF.is_symlink()
    if had_conf:
        SYSTEM_SLURM_CONF.rename(backup)
    SYSTEM_SLURM_CONF.symlink_to(conf)
    try:
        yield
    finally:
        SYSTEM_SLURM_CONF.unlink()
        if had_conf:
            backup.rename(SYSTEM_SLURM_CONF)
        if created_dir:
            SYSTEM_SLURM_CONF.parent.rmdir()


def cancel_all_jobs(cluster: SlurmCluster) -> None:
    """scancel every job of the throw-away partition and wait until none is left."""
    cluster.run("scancel", f"--partition={cluster.partition}")
    wait_for(lambda: not cluster.unfinished_job_ids(), "cancelled jobs to end")


def node_state(cluster: SlurmCluster) -> str:
    """The node's state as sinfo reports it ("" while slurmctld does not answer yet)."""
    result = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=cluster.env, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)
