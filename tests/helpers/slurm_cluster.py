"""A real single-host Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's packages.

Everything the daemons write (a fresh munge key, slurm.conf, state, spool, pid and log files)
lives in one temporary directory, removed when the cluster stops. The Slurm commands find this
cluster through SLURM_CONF, which ``SlurmCluster.environment`` sets; nothing outside the
directory changes. The cluster's single node is this host, at 127.0.0.1, with room for two
one-CPU tasks whatever the machine has (cons_tres counts CPUs, and the configured count wins).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from meshplan.launch import free_port

INSTALL = "apt-get install slurm-wlm munge (as root)"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
COMMANDS = ("srun", "sbatch", "sinfo", "scontrol", "scancel")
PARTITION = "debug"
CPUS = 2
START_TIMEOUT = 60.0  # seconds for the node to show idle; the daemons take 2-5 s here
STOP_TIMEOUT = 10.0  # seconds a daemon gets to exit after SIGTERM


def unavailable() -> str | None:
    """Why no cluster can start here (a skip message naming what is missing and how to get it), or None."""
    missing = [name for name in (*DAEMONS, *COMMANDS) if _find(name) is None]
    if missing:
        return f"a real Slurm cluster needs {', '.join(missing)}, which are not installed: {INSTALL}"
    if os.geteuid() != 0:
        return ("the test Slurm cluster runs its daemons as root (SlurmUser=root), and this user is not: run the tests "
                "as root, with slurm-wlm and munge installed (apt-get install slurm-wlm munge)")
    host = node_name()
    try:
        socket.gethostbyname(host)
    except OSError:
        return (f"this host's name {host!r} does not resolve, and Slurm and the launchers address the node by it: "
                f"add '127.0.0.1 {host}' to /etc/hosts")
    return None


def node_name() -> str:
    """This host's short name (``hostname -s``): slurmd finds its NodeName by it."""
    return socket.gethostname().split(".")[0]


def _find(name: str) -> str | None:
    """The program's path; the daemons live in /usr/sbin, which a non-login PATH may lack."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin")


@dataclass
class SlurmCluster:
    """The running cluster: its directory, configuration and daemons."""

    root: Path
    node: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        """The cluster's slurm.conf."""
        return self.root / "slurm.conf"

    def environment(self, **extra: str) -> dict[str, str]:
        """This process's environment, with SLURM_CONF naming this cluster, plus ``extra``."""
        return {**os.environ, "SLURM_CONF": str(self.conf), **extra}

    def command(self, *arguments: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Runs a Slurm client command against this cluster; its output, whatever its exit code."""
        return subprocess.run(arguments, env=self.environment(), capture_output=True, text=True, timeout=timeout)

    def logs(self, lines: int = 30) -> str:
        """The last lines of every daemon's log, for an error message."""
        parts = []
        for path in sorted(self.root.glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)


def _write_conf(cluster: SlurmCluster, ctld_port: int, slurmd_port: int) -> None:
    root = cluster.root
    for folder in ("state", "spool"):
        (root / folder).mkdir()
    cluster.conf.write_text("\n".join([
        "ClusterName=meshplan",
        f"SlurmctldHost={cluster.node}(127.0.0.1)",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        # No cgroups: processes are tracked through /proc and tasks are not bound to CPUs.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",  # CPUs are the consumable: two one-CPU tasks share the node
        "MpiDefault=none",
        "ReturnToService=2",
        "MailProg=/bin/true",
        # sbatch --wait polls after 2, 8, then every 32 s while 4x its wait stays under MinJobAge/2:
        # with 10 s it polls every 8 s (a job of 11 s is not noticed at 42 s), and a finished job's
        # record still outlives a poll.
        "MinJobAge=10",
        # The node's CPUs as configured, not as detected: two tasks fit on a one-core CI machine too.
        "SlurmdParameters=config_overrides",
        f"NodeName={cluster.node} NodeAddr=127.0.0.1 CPUs={CPUS} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))


def _start(cluster: SlurmCluster, name: str, *arguments: str) -> None:
    """Starts a daemon in the foreground mode, its own output in NAME.out.log (what it says before its log file opens)."""
    with open(cluster.root / f"{name}.out.log", "w") as output:
        cluster.processes[name] = subprocess.Popen([_find(name) or name, *arguments], stdout=output, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_for(cluster: SlurmCluster, what: str, ready, timeout: float) -> None:
    """Polls ``ready()`` until it is true; fails with the daemons' logs when a daemon exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        exited = {name: process.returncode for name, process in cluster.processes.items() if process.poll() is not None}
        if exited or time.monotonic() > deadline:
            reason = f"{', '.join(f'{name} exited with {code}' for name, code in exited.items())}" if exited else \
                f"not within {timeout:.0f} s"
            raise RuntimeError(f"the test Slurm cluster in {cluster.root} did not reach '{what}' ({reason}):\n{cluster.logs()}")
        time.sleep(0.3)


def _node_state(cluster: SlurmCluster) -> str:
    try:
        return cluster.command("sinfo", "--noheader", "--Node", "--format=%t", timeout=10).stdout.strip()
    except subprocess.TimeoutExpired:
        return ""


def _stop(cluster: SlurmCluster) -> None:
    """Cancels every job, then stops slurmd, slurmctld and munged: SIGTERM, a wait, then SIGKILL."""
    if "slurmctld" in cluster.processes and cluster.processes["slurmctld"].poll() is None:
        # A stop goes on whatever happens here; the daemons are stopped below in any case.
        with contextlib.suppress(OSError, subprocess.TimeoutExpired, RuntimeError):
            cluster.command("scancel", f"--partition={PARTITION}", "--full", timeout=10)
            # scancel returns at once, and a job's processes outlive slurmd: wait until the queue is empty.
            _wait_for(cluster, "cancelled jobs to end", lambda: not cluster.command("squeue", "--noheader", timeout=10)
                      .stdout.strip(), STOP_TIMEOUT)
    for name in ("slurmd", "slurmctld", "munged"):
        process = cluster.processes.get(name)
        if process is None or process.poll() is not None:
            continue
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _two_free_ports() -> tuple[int, int]:
    """Two distinct free ports (two calls of free_port may return the same one)."""
    first = free_port()
    second = free_port()
    while second == first:
        second = free_port()
    return first, second


@contextlib.contextmanager
def started(timeout: float = START_TIMEOUT) -> Iterator[SlurmCluster]:
    """A cluster whose node is idle; stopped and removed on exit. Check ``unavailable()`` first."""
    # Not pytest's tmp_path: munged requires every directory above its socket to be searchable by
    # all (pytest's are private), and a socket path must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="meshplan-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root, node_name())
    try:
        subprocess.run([_find("mungekey") or "mungekey", "--create", f"--keyfile={root / 'munge.key'}"], check=True,
                       capture_output=True, timeout=30)
        # -F: in the foreground, logging to its output (its --log-file is for the daemon mode).
        _start(cluster, "munged", "--foreground", f"--socket={root / 'munge.socket'}", f"--key-file={root / 'munge.key'}",
               f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}")
        _wait_for(cluster, "munge socket", (root / "munge.socket").exists, timeout)
        _write_conf(cluster, *_two_free_ports())
        _start(cluster, "slurmctld", "-D", "-f", str(cluster.conf))
        _start(cluster, "slurmd", "-D", "-f", str(cluster.conf), "-N", cluster.node)
        _wait_for(cluster, "node idle", lambda: _node_state(cluster) == "idle", timeout)
        yield cluster
    finally:
        _stop(cluster)
        shutil.rmtree(root, ignore_errors=True)
