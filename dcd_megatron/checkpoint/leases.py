"""Read leases: a reader holds the checkpoint it loads, and a run rotating its checkpoints skips a held one.

A lease is a shared `flock` on `<checkpoints>/.leases/<iter_name>.lock`, taken before the reader
verifies the checkpoint and kept until its load is done (a killed reader's lease goes with its
process). The trainer removes an old checkpoint only under an exclusive, non-blocking lock on the
same file, so it never removes one mid-read: a held checkpoint waits for a later save. Where no lease
can be taken (a folder the reader may not write, a file system without flock), the reader says so.
Cross-node leases need a file system whose flock is cluster-wide (NFSv4, GPFS, Lustre mounted
with `flock`; Lustre's `localflock` is per node).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from pathlib import Path

LEASES = ".leases"

_held: dict[Path, int] = {}  # checkpoint -> the open lock file descriptor of this process's lease


def lease_file(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.parent / LEASES / f"{checkpoint.name}.lock"


def _open(path: Path, flags: int) -> int:
    path.parent.mkdir(exist_ok=True)
    return os.open(path, flags | os.O_CREAT, 0o666)


def _still_linked(fd: int, path: Path) -> bool:
    """The lock file we hold is the one at `path` (not one a remover unlinked after we opened it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def rotatable(checkpoint: Path) -> bool:
    """A checkpoint a run may remove: an iter_NNNNNNN folder of a run's checkpoints/ (not a dcd-convert output)."""
    return re.fullmatch(r"iter_\d{7}", Path(checkpoint).name) is not None


def take(checkpoint: Path, wait_s: float = 60.0) -> str | None:
    """Hold a shared read lease on `checkpoint` until `release` (or exit); None, or why none could be taken."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint in _held or not rotatable(checkpoint):
        return None
    path = lease_file(checkpoint)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = _open(path, os.O_RDONLY)
        except FileNotFoundError:  # the checkpoints folder, or a remover's emptied .leases, just went
            if not checkpoint.parent.is_dir() or time.monotonic() > deadline:
                return f"{path.parent} keeps disappearing"
            continue
        except OSError as exc:
            return f"{path.parent} is not writable here ({exc.strerror or exc})"
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a run is removing it right now: it will be gone when the lock frees
            os.close(fd)
            if time.monotonic() > deadline:
                return f"{path} stayed locked by a run removing the checkpoint"
            time.sleep(0.05)
            continue
        except OSError as exc:
            os.close(fd)
            return f"the file system does not support flock ({exc.strerror or exc})"
        if _still_linked(fd, path):
            _held[checkpoint] = fd
            return None
        os.close(fd)  # removed and unlinked while we waited: take the lease on the new file


def release(checkpoint: Path) -> None:
    fd = _held.pop(Path(checkpoint).resolve(), None)
    if fd is not None:
        os.close(fd)


def remove_unless_read(checkpoint: Path) -> bool:
    """Remove `checkpoint` unless a reader holds a lease on it (then False: try again later)."""
    checkpoint = Path(checkpoint)
    path = lease_file(checkpoint)
    try:
        fd = _open(path, os.O_RDWR)
    except OSError:  # no lease folder can exist here, so no reader holds one
        shutil.rmtree(checkpoint, ignore_errors=True)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:  # no flock on this file system: readers cannot hold leases either
            pass
        shutil.rmtree(checkpoint, ignore_errors=True)
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)
        try:
            path.parent.rmdir()  # no folder left behind once no reader holds anything
        except OSError:
            pass
