"""One run per output directory: an `O_EXCL` lock file that works where `flock` may not (NFS, Lustre).

`OUTPUT_DIR/.dcd.lock` is created with `O_CREAT | O_EXCL` and holds one JSON line: host, pid (and
the process's start time, the machine's boot id and pid namespace), Slurm job id and restart count,
start time, command and a random token. The holder refreshes the file's mtime every
`HEARTBEAT_S` seconds from a daemon thread and removes it at the end of the run, only when it
still holds its own token. A lock found in place is stale (taken over, with a logged line) when:

- same host, same boot and pid namespace: its pid is gone, a zombie, or another process now (start time);
- same host, another boot: the machine restarted since;
- its Slurm job is this job before a requeue (same job id, another `SLURM_RESTART_COUNT`), or
  `squeue` on the same cluster no longer knows the job as active;
- otherwise (another host or container): its mtime is more than `DCD_LOCK_STALE_MINUTES`
  (default 10; 0 = never) older than the file server's clock (a probe file measures "now").

Anything else is a live holder: the run stops with one line naming it and the fix. docs/checkpoints.md
("The output directory lock") says the same for users.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from dcd_megatron.errors import UserError
from dcd_megatron.tracking.redact import redact_text

LOCK_NAME = ".dcd.lock"
HEARTBEAT_S = 60.0  # the holder touches the lock this often
STALE_ENV = "DCD_LOCK_STALE_MINUTES"  # a foreign lock untouched this long is stale (0: never)
DEFAULT_STALE_MINUTES = 10.0
UNREADABLE_GRACE_S = 60.0  # an empty / half-written lock older than this lost its writer
# squeue states of a job that may still be running (anything else is over)
SLURM_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}

_HELD: dict[Path, OutputLock] = {}  # locks this process holds (released at exit if a run forgot)


class OutputDirError(UserError, RuntimeError):
    """The output directory cannot be used: not a directory, not writable, or held by another run."""


class OutputDirBusyError(OutputDirError):
    """Another live run holds the output directory's lock."""


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) from /proc/<pid>/stat, where there is one."""
    text = _read(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_record(command: str | None = None) -> dict:
    """Who takes the lock: the fields a later run needs to judge whether this one is still alive."""
    stat = _proc_stat(os.getpid())
    env = os.environ
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": stat[1] if stat else None,
        "boot_id": _read("/proc/sys/kernel/random/boot_id"),
        "pid_ns": _pid_namespace(),
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "slurm_restart_count": env.get("SLURM_RESTART_COUNT", "0") if env.get("SLURM_JOB_ID") else None,
        "slurm_cluster": env.get("SLURM_CLUSTER_NAME"),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": redact_text(command if command is not None else shlex.join(sys.argv))[:2000],
        "token": secrets.token_hex(8),
    }


def describe(record: dict) -> str:
    """`host H, pid P, Slurm job J, started T: COMMAND`."""
    parts = [f"host {record.get('host', '?')}", f"pid {record.get('pid', '?')}"]
    if record.get("slurm_job_id"):
        parts.append(f"Slurm job {record['slurm_job_id']}")
    parts.append(f"started {record.get('started_at', '?')}")
    command = redact_text(str(record.get("command") or ""))  # also a lock written by an older version
    if len(command) > 160:
        command = command[:157] + "..."
    return ", ".join(parts) + (f": `{command}`" if command else "")


def stale_minutes() -> float:
    """`DCD_LOCK_STALE_MINUTES` (default 10): a foreign lock untouched this long is stale; 0 = never."""
    raw = os.environ.get(STALE_ENV, "")
    try:
        minutes = float(raw) if raw.strip() else DEFAULT_STALE_MINUTES
    except ValueError:
        minutes = -1.0
    if not minutes >= 0:
        raise OutputDirError(f"{STALE_ENV}={raw!r} is not a number of minutes >= 0; unset it (10) or set e.g. 30")
    return minutes


def _same_machine(record: dict) -> bool | None:
    """True: this host, boot and pid namespace; None: this host rebooted since; False: elsewhere."""
    if record.get("host") != socket.gethostname():
        return False
    ours = _pid_namespace()
    if record.get("pid_ns") and ours and record["pid_ns"] != ours:
        return False  # another container on this host: its pids are not ours to test
    boot = _read("/proc/sys/kernel/random/boot_id")
    if record.get("boot_id") and boot and record["boot_id"] != boot:
        return None
    return True


def _local_stale_reason(record: dict, path: Path) -> str | None:
    """Why a lock of this machine is stale (its process is gone), or None while it lives."""
    pid = int(record.get("pid", -1))
    if pid == os.getpid():
        held = _HELD.get(path)
        return None if held is not None and held.token == record.get("token") else "left by an earlier run of this process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} is gone"
    except PermissionError:
        pass  # it exists, under another user
    stat = _proc_stat(pid)
    if stat and stat[0] == "Z":
        return f"process {pid} has exited"
    if stat and record.get("pid_start") and stat[1] != str(record["pid_start"]):
        return f"process {pid} has exited (the pid now belongs to another process)"
    return None


def slurm_job_finished(job_id: str, cluster: str | None) -> bool | None:
    """Whether Slurm says the job is over (None: no squeue, another cluster, or no answer)."""
    squeue = shutil.which("squeue")
    if not squeue or not cluster or cluster != os.environ.get("SLURM_CLUSTER_NAME"):
        return None
    try:
        proc = subprocess.run([squeue, "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return True if "invalid job id" in proc.stderr.lower() else None
    states = set(proc.stdout.split())
    return not (states & SLURM_ACTIVE)


def _server_now(directory: Path) -> float:
    """Now in the clock of the directory's file server (a probe file's mtime): immune to node clock skew."""
    probe = directory / f"{LOCK_NAME}.probe-{socket.gethostname()}-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            return os.fstat(fd).st_mtime
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError:
        return time.time()


def _foreign_stale_reason(record: dict, age_s: float) -> str | None:
    """Why a lock of another host (or container) is stale, or None while its holder may live."""
    job = record.get("slurm_job_id")
    if job and job == os.environ.get("SLURM_JOB_ID"):
        if str(record.get("slurm_restart_count")) != os.environ.get("SLURM_RESTART_COUNT", "0"):
            return f"Slurm job {job} was requeued since (this is its restart {os.environ.get('SLURM_RESTART_COUNT', '0')})"
    elif job and slurm_job_finished(job, record.get("slurm_cluster")):
        return f"Slurm job {job} has finished"
    minutes = stale_minutes()
    if minutes and age_s > minutes * 60:
        return f"its holder stopped refreshing it {age_s / 60:.0f} min ago (over {STALE_ENV}={minutes:g})"
    return None


def stale_reason(record: dict | None, path: Path, age_s: float) -> str | None:
    """Why the lock at `path` (holding `record`, None when unreadable, `age_s` old) is stale, or None."""
    if record is None:
        return f"it is unreadable and {age_s:.0f} s old" if age_s > UNREADABLE_GRACE_S else None
    same = _same_machine(record)
    if same is None:
        return f"host {record.get('host')} has restarted since"
    return _local_stale_reason(record, path) if same else _foreign_stale_reason(record, age_s)


def busy_message(setting: str, directory: Path, record: dict | None) -> str:
    """The one line a second run stops with: who holds the directory and the three ways on."""
    path = directory / LOCK_NAME
    who = describe(record) if record is not None else f"a run whose lock file {path} is unreadable"
    mine = bool(record) and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()
    whose = "an unfinished run of this same process" if mine else "another run"
    return (f"{setting}={directory} is in use by {whose} ({who}); wait for it to finish, use another "
            f"{setting}, or, if you are sure that run is gone, delete {path}")


def _check_directory(directory: Path, setting: str) -> None:
    """The directory exists (made if needed) and is one: else a one-line error with the fix."""
    if directory.exists() and not directory.is_dir():
        raise OutputDirError(
            f"{setting}={directory} is a regular file, not a directory; pass a directory (a new path, or an "
            "earlier run's output directory to resume it), or move the file away")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputDirError(
            f"{setting}={directory} cannot be made: a part of the path is a file (or a broken link); "
            "pass a directory path") from None
    except OSError as exc:
        raise OutputDirError(
            f"{setting}={directory} cannot be made ({exc.strerror or exc}); pass a directory you can write") from None


class OutputLock:
    """The lock this process holds on one output directory (release() at the end of the run)."""

    def __init__(self, directory: Path, record: dict, text: str, heartbeat_s: float):
        self.directory, self.path, self.record, self._text = directory, directory / LOCK_NAME, record, text
        self.token = record["token"]
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), name="dcd-output-lock", daemon=True)
        _HELD[self.path] = self
        self._thread.start()

    def _beat(self, heartbeat_s: float) -> None:
        """Refresh the mtime (a foreign host judges liveness by it); say once if the lock was taken away."""
        while not self._stop.wait(heartbeat_s):
            try:
                if self.path.read_text().strip() != self._text:
                    raise FileNotFoundError  # internal
                os.utime(self.path)
            except FileNotFoundError:
                if not self.lost:
                    self.lost = True
                    print(f"warning: the lock {self.path} was removed or replaced while this run used the "
                          "directory; another run may now write into it", file=sys.stderr, flush=True)
            except OSError:
                pass  # a slow or flaky filesystem: try again next beat

    def held(self) -> bool:
        """Whether the lock file is still this run's (read now; a save asks before it writes)."""
        try:
            return self.path.read_text().strip() == self._text
        except OSError:
            return False

    def release(self) -> bool:
        """Remove the lock if it is still ours (re-read first); True when removed. Safe to call twice."""
        if self._stop.is_set():
            return False
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
        try:
            if self.path.read_text().strip() != self._text:
                return False
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class NoLock:
    """What a rank other than 0 holds: rank 0 holds the run's lock."""

    lost = False

    def held(self) -> bool:
        return True

    def release(self) -> bool:
        return False

    def __enter__(self) -> NoLock:
        return self

    def __exit__(self, *exc) -> None:
        pass


def _create(path: Path, text: str) -> bool:
    """Create the lock file with `text` atomically against other creators; False if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (text + "\n").encode())
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _seen(path: Path) -> tuple[str, dict | None, float] | None:
    """(text, parsed record or None, mtime) of the lock in place; None when there is none."""
    for attempt in range(5):  # an empty file may be a creator between O_EXCL and its write
        try:
            text, mtime = path.read_text().strip(), path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
            if isinstance(record, dict) and "pid" in record:
                return text, record, mtime
        except ValueError:
            pass
        time.sleep(0.02 * (attempt + 1))
    return text, None, mtime


def _take_over(path: Path, seen_text: str) -> bool:
    """Move the stale lock aside (rename is atomic: one taker wins) and delete it; False if another was faster."""
    aside = path.with_name(f"{LOCK_NAME}.stale-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if aside.read_text().strip() != seen_text:  # a fresh lock replaced the stale one meanwhile: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
        except OSError:
            if not path.exists():
                os.rename(aside, path)
                return False
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def acquire(directory: str | Path, *, setting: str = "train.output_dir", command: str | None = None,
            heartbeat_s: float = HEARTBEAT_S, log=print) -> OutputLock:
    """Take the lock on `directory` (made if missing), taking over a stale one with a logged line;
    OutputDirBusyError when a live run holds it, OutputDirError when the directory cannot be used."""
    directory = Path(directory)
    stale_minutes()  # a bad setting is refused even while the directory is free
    _check_directory(directory, setting)
    path = directory / LOCK_NAME
    record = owner_record(command)
    text = json.dumps(record, sort_keys=True)
    for _ in range(5):
        try:
            created = _create(path, text)
        except OSError as exc:
            raise OutputDirError(
                f"{setting}={directory}: cannot write {path} ({exc.strerror or exc}); pass a directory you can write"
            ) from None
        if created:
            return OutputLock(directory, record, text, heartbeat_s)
        seen = _seen(path)
        if seen is None:
            continue  # released between our create and our read: try again
        seen_text, holder, mtime = seen
        reason = stale_reason(holder, path, _server_now(directory) - mtime)
        if reason is None:
            raise OutputDirBusyError(busy_message(setting, directory, holder))
        if _take_over(path, seen_text):
            who = describe(holder) if holder else "unreadable"
            log(f"took over the stale lock {path} ({who}): {reason}", flush=True)
    raise OutputDirBusyError(busy_message(setting, directory, (_seen(path) or (None, None, 0))[1]))


def lock_output_dir(directory: str | Path, *, setting: str, rank: int, world_size: int,
                    command: str | None = None) -> OutputLock | NoLock:
    """Rank 0 takes the lock; every rank learns the verdict (one broadcast), so all stop together on
    an error instead of the others hanging. Collective when `world_size` > 1."""
    verdict, lock, crash = None, NoLock(), None
    if rank == 0:
        try:
            lock = acquire(directory, setting=setting, command=command)
        except OutputDirError as exc:
            verdict = (type(exc).__name__, str(exc))
        except Exception as exc:  # not a user error: rank 0 shows its traceback, the others stop with it
            crash, verdict = exc, ("crash", f"rank 0 could not lock {directory}: {exc!r}")
    if world_size > 1:
        from dcd_megatron.runtime.distributed import share_object

        verdict = share_object(verdict, 0)
    if crash is not None:
        raise crash
    if verdict is not None:
        kinds = {OutputDirBusyError.__name__: OutputDirBusyError, OutputDirError.__name__: OutputDirError}
        raise kinds.get(verdict[0], RuntimeError)(verdict[1])
    return lock


@atexit.register
def _release_all() -> None:
    """A run that ended without releasing (sys.exit in the middle) still frees its directory."""
    for lock in list(_HELD.values()):
        lock.release()
