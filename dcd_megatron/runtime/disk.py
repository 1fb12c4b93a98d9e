"""Before the first step: can the run write every folder it will write, with room for a checkpoint?

A read-only mount or a full disk found at the first save loses the work up to it; found at start
it costs nothing. Each problem is one `DiskError` line naming the folder, the setting and the fix.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from dcd_megatron.errors import UserError

# errno values of a disk that cannot take a write (full, over quota, read-only, refused, failing)
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


class DiskError(UserError, OSError):
    """A folder the run writes is not writable, or has too little free space; the message says which and the fix."""


@dataclass(frozen=True)
class Target:
    """A folder the run will write, the setting that names it, and the bytes it needs free (0: any)."""

    path: Path
    setting: str
    need_bytes: int = 0
    what: str = ""  # what needs the space, for the message


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def problem(target: Target) -> str | None:
    """Why `target` cannot be written as the run needs (one line), or None: creates the folder, writes a probe file."""
    path, fix = target.path, f"point {target.setting} at a writable disk with room"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".dcd-write-probe-{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        return f"{target.setting}: {path} is not writable ({exc.strerror or exc}); {fix}"
    free = shutil.disk_usage(path).free
    if free < target.need_bytes:
        return (f"{target.setting}: {path} has {gib(free)} free, {target.what or 'the run'} needs about "
                f"{gib(target.need_bytes)}; free space there or {fix}")
    return None


def check_writable(targets: list[Target]) -> None:
    """Raise one DiskError naming the first target that cannot be written (or lacks the room it needs)."""
    for target in targets:
        found = problem(target)
        if found:
            raise DiskError(found)
