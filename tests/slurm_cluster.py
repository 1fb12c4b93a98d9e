"""A real one-node Slurm cluster on loopback for tests: daemons in a temp dir, stopped by PID.

Debian's slurm-wlm 22.05 runs without systemd or munge with ``auth/none``. The daemons run in
the foreground in their own sessions; every client call gets ``SLURM_CONF`` pointing at this
cluster, so nothing on the host (``/etc/slurm``) is read or changed. Use the ``slurm_cluster``
fixture (``from tests.slurm_cluster import slurm_cluster``) or ``SlurmCluster`` as a context
manager. Packages are installed with apt when missing and root; otherwise tests SKIP loudly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from dcd_megatron.runtime.distributed import free_port

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client")
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
     "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
)


class SlurmError(RuntimeError):
    """The test cluster failed to start, to accept a job, or to report on it."""


def _missing_binaries() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None]


def ensure_slurm_installed(timeout: float = 900) -> str | None:
    """Install slurm-wlm with apt when missing; return None when usable, else why not."""
    if not _missing_binaries():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"Slurm binaries {_missing_binaries()} are missing and cannot be installed here "
                f"(needs root and apt-get): run `apt-get install -y {' '.join(SLURM_PACKAGES)}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *SLURM_PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out after {timeout:.0f}s"
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed (rc={proc.returncode}): {proc.stderr.strip()[-800:]}"
    missing = _missing_binaries()
    return f"apt installed {SLURM_PACKAGES} but {missing} are still missing" if missing else None


def node_line() -> str:
    """This machine's ``NodeName=... CPUs=... RealMemory=...`` line as slurmd detects it."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), None)
    if line is None:
        raise SlurmError(f"`slurmd -C` printed no NodeName line: {out!r}")
    return line.strip()


def render_conf(root: Path, ctld_port: int, slurmd_port: int, node: str, user: str) -> str:
    """slurm.conf text for a one-node cluster whose every path lies under ``root``."""
    host = socket.gethostname().split(".")[0]
    return "\n".join([
        "ClusterName=dcdtest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={slurmd_port}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/none",
        "CredType=cred/none",
        "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        # A job that cannot fit (e.g. an unchanged 8-node header) is rejected, not left pending.
        "EnforcePartLimits=ALL",
        "ReturnToService=2",
        "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job`
        "KillWait=5",
        "InactiveLimit=0",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        f"PlugStackConfig={root / 'plugstack.conf'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def parse_job_record(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output as a dict (values may contain '=' but not spaces)."""
    return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)


class SlurmCluster:
    """A running one-node cluster: ``submit``, ``wait``, ``job_output``; ``stop`` kills by PID."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, timeout: float = 60) -> SlurmCluster:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "plugstack.conf").write_text("")  # no SPANK plugins (pyxis) from the host
        user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        self.conf.write_text(render_conf(self.root, free_port(), free_port(), node_line(), user))
        try:
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._until(lambda: self._run(["scontrol", "ping"], check=False).stdout.count("UP") > 0,
                        timeout, "slurmctld to answer `scontrol ping`")
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._until(self._node_idle, timeout, "the node to become idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, then end the daemons by their PIDs (TERM, then KILL)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self._run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self._run(["scancel", *jobs], check=False)
                try:
                    self._until(lambda: not self._run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip(),
                                timeout, "cancelled jobs to leave the queue")
                except SlurmError:
                    pass  # the daemons go anyway; leftover job processes are reported by pids()
        for name in ("slurmd", "slurmctld"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def daemon_pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def leftover_pids(self) -> list[int]:
        """Live processes of this cluster: daemons, job steps and job processes (by SLURM_CONF)."""
        found = set(pids_alive(list(self.daemon_pids().values())))
        pgrep = subprocess.run(["pgrep", "-f", str(self.conf)], capture_output=True, text=True)
        found.update(int(p) for p in pgrep.stdout.split())
        marker = f"SLURM_CONF={self.conf}".encode()
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                if marker in (proc_dir / "environ").read_bytes().split(b"\0"):
                    found.add(int(proc_dir.name))
            except OSError:
                continue  # gone, or not ours to read
        found.discard(os.getpid())
        return pids_alive(sorted(found))

    # -- client helpers ------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The caller's environment minus any outer Slurm job's variables, plus ``SLURM_CONF``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def submit(self, script: Path | str, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
               sbatch_args: Sequence[str] = (), cwd: Path | str | None = None) -> int:
        """``sbatch [sbatch_args] script [args]``; returns the job id or raises with sbatch's error."""
        full_env = {**self.env, **(env or {})}
        cmd = ["sbatch", "--parsable", *sbatch_args, str(script), *args]
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, cwd=cwd or self.root, timeout=60)
        if proc.returncode != 0:
            raise SlurmError(f"sbatch refused the job (rc={proc.returncode}): {proc.stderr.strip()}\n  cmd: {cmd}")
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        proc = self._run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if proc.returncode != 0 or "JobId=" not in proc.stdout:
            raise SlurmError(f"scontrol knows no job {job_id}: {proc.stderr.strip() or proc.stdout.strip()}")
        return parse_job_record(proc.stdout)

    def wait(self, job_id: int, timeout: float = 300, poll: float = 0.5) -> str:
        """Poll until the job reaches a terminal state; return it (raises after ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_info(job_id).get("JobState", "UNKNOWN")
            if state in TERMINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} still {state} after {timeout:.0f}s\n{self.job_output(job_id)[-3000:]}")
            time.sleep(poll)

    def signal_job(self, job_id: int, signal_name: str) -> None:
        """Send a signal (e.g. ``USR1``) to the job's steps, i.e. to every running task."""
        self._run(["scancel", f"--signal={signal_name}", str(job_id)])

    def job_output(self, job_id: int) -> str:
        """The job's stdout file (``#SBATCH --output``), or '' before it exists."""
        path = Path(self.job_info(job_id).get("StdOut", ""))
        return path.read_text(errors="replace") if path.is_file() else ""

    def logs(self) -> str:
        """The tails of both daemons' logs, for failure messages."""
        parts = []
        for name in ("slurmctld", "slurmd"):
            log = self.root / f"{name}.log"
            if log.is_file():
                parts.append(f"--- {name}.log ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    # -- internals -----------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.console", "wb")  # noqa: SIM115 - lives as long as the daemon
        # start_new_session == setsid: the daemon leads its own session, away from pytest's signals.
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def _node_idle(self) -> bool:
        states = self._run(["sinfo", "-h", "-o", "%T"], check=False).stdout.split()
        return bool(states) and all(re.fullmatch(r"idle\W?", s) for s in states)

    def _until(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited (rc={proc.returncode}) while waiting for {what}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")
            time.sleep(0.2)


def pids_alive(pids: Iterator[int] | Sequence[int]) -> list[int]:
    """The subset of ``pids`` still running (zombies count as gone)."""
    alive = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            alive.append(pid)
    return alive


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A started one-node cluster for a test module; its daemons are stopped at module end."""
    reason = ensure_slurm_installed()
    if reason:
        pytest.skip(f"NO REAL SLURM CLUSTER: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    with cluster:
        yield cluster
