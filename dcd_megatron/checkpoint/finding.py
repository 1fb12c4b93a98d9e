"""Finding checkpoints: ours are real `iter_NNNNNNN` directories with a manifest that verifies.

Anything else under `checkpoints/` that looks like one (a symbolic link, a file, an
`iter_*` link to elsewhere) is foreign: it is named in a warning and never loaded, deleted
or written through. A damaged newest checkpoint falls back to the newest one that verifies.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dcd_megatron.checkpoint import leases
from dcd_megatron.checkpoint.manifest import Part, verify
from dcd_megatron.errors import UserError, UserFileNotFoundError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^iter_(\d{7})$")
META = "meta.json"


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for; the message names each one tried and the fix."""


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def step_of(path: Path) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_ours(path: Path) -> bool:
    """A real directory (not a link) named iter_NNNNNNN: a checkpoint this code renamed into place."""
    path = Path(path)
    return step_of(path) is not None and not path.is_symlink() and path.is_dir()


def foreign_entries(root: Path) -> list[Path]:
    """Entries of `root` named like checkpoints (iter_*, latest) that are not ours: links, files."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir()
        if (p.name.startswith("iter_") and (p.is_symlink() or not p.is_dir()))
        or (p.name == "latest" and (p.is_symlink() or not p.is_file()))
    )


def warn_foreign(root: Path, say: Callable[[str], None] | None = None) -> list[Path]:
    """Name each foreign entry of `root` once (they are skipped, never followed); returns them."""
    found = foreign_entries(root)
    for path in found:
        target = f" -> {path.readlink()}" if path.is_symlink() else ""
        (say or log.warning)(
            f"ignoring {path}{target}: not a checkpoint directory written by dcd-train "
            "(never loaded or deleted through); remove it if it is not yours to keep"
        )
    return found


def complete_checkpoints(root: Path) -> list[Path]:
    """Our checkpoints under `root` that have their meta.json, oldest first (not yet verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_ours(p) and (p / META).is_file() and not (p / META).is_symlink()]
    return sorted(found, key=step_of)


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` by name (not verified: `select_verified` does that)."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def candidates(root: Path) -> list[Path]:
    """Every real iter_* directory under `root`, newest first: complete or not, each is verified."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_ours(p)), key=step_of, reverse=True)


@dataclass
class Selection:
    """The checkpoint to load (None: none found) and the newer ones that failed verification."""

    chosen: Path | None
    rejected: list[tuple[Path, list[str]]] = field(default_factory=list)

    def fallback_lines(self) -> list[str]:
        return [
            f"checkpoint {path} is damaged ({'; '.join(problems[:3])}"
            f"{f'; {len(problems) - 3} more' if len(problems) > 3 else ''}): "
            + (f"falling back to {self.chosen.name}" if self.chosen else "no older checkpoint verifies")
            for path, problems in self.rejected
        ]


def select_verified(found: list[Path], part: Part = (0, 1), gather=None) -> Selection:
    """The first of `found` (newest first) whose manifest verifies; the damaged ones before it."""
    selection = Selection(chosen=None)
    for path in found:
        problems = verify(path, part, gather)
        if not problems:
            selection.chosen = path
            return selection
        selection.rejected.append((path, problems))
    return selection


def move_aside(path: Path, label: str) -> Path:
    """Rename `path` (a link itself, never its target) to `<name>.<label>-K`: kept, out of the way,
    never loaded or cleaned up (`damaged` checkpoints, `foreign` entries in a checkpoint's place)."""
    path = Path(path)
    for k in range(1, 1000):
        aside = path.with_name(f"{path.name}.{label}-{k}")
        if not aside.exists() and not aside.is_symlink():
            os.rename(path, aside)
            log.warning("moved %s out of the way to %s (%s)", path, aside.name, label)
            return aside
    raise CheckpointError(f"{path} is in the way and cannot be moved aside ({label}); remove it")


def damaged_error(where: Path, selection: Selection, fix: str) -> CheckpointError:
    details = " | ".join(f"{p.name}: {'; '.join(problems[:2])}" for p, problems in selection.rejected)
    return CheckpointError(f"no checkpoint under {where} verifies ({details}); {fix}")


RESUME_FIX = ("restore the damaged files, point train.resume at a checkpoint that verifies, "
              "or start over with train.resume=never in a new train.output_dir")
READ_FIX = "restore the damaged files or pass a checkpoint that verifies"


def _verified_or_raise(found: list[Path], fix: str, part: Part = (0, 1), gather=None) -> Selection:
    """`select_verified`, or the one-line error naming each checkpoint tried when none verifies."""
    selection = select_verified(found, part, gather)
    if selection.chosen is None:
        raise damaged_error(found[0].parent, selection, fix)
    return selection


def _found_under(path: Path) -> list[Path]:
    """The checkpoints of a run dir or of its checkpoints/ folder, newest first."""
    return candidates(path) or candidates(path / "checkpoints")


def resolve_resume(resume: str, root: Path, part: Part = (0, 1), gather=None) -> Selection:
    """`auto`: the newest checkpoint under root that verifies; `never`: none; else that path.

    A path to one iter_NNNNNNN directory must verify itself (no silent fallback from an
    explicit choice); a run dir or checkpoints/ folder falls back like `auto`.
    """
    if resume == "never":
        return Selection(chosen=None)
    if resume == "auto":
        found = candidates(root)
        return _verified_or_raise(found, RESUME_FIX, part, gather) if found else Selection(chosen=None)
    path = Path(resume)
    found = [path] if is_ours(path) else _found_under(path)
    if not found:
        raise UserFileNotFoundError(
            f"train.resume={resume}: no checkpoint there (a run dir, its checkpoints/ or an iter_NNNNNNN "
            "directory written by dcd-train); use train.resume=auto or never"
        )
    return _verified_or_raise(found, RESUME_FIX, part, gather)


def _single_checkpoint(path: Path) -> bool:
    """A directory that is itself one checkpoint (an iter dir, or a dcd-convert output)."""
    return path.is_dir() and not path.is_symlink() and (path / META).is_file()


def locate_verified(checkpoint: Path, say: Callable[[str], None] | None = None, *, hold: bool = False) -> Path:
    """The checkpoint a reader (dcd-eval, dcd-convert, init_checkpoint, dcd-score) loads, verified and held.

    `checkpoint` is one checkpoint directory (it must verify), a run's output_dir or its
    checkpoints/ folder (the newest checkpoint that verifies, naming any damaged newer one). It is
    leased while it is verified, and with `hold` until `leases.release` (a loader's whole read), so
    a run still saving there does not rotate it away mid-read; one removed before the lease is passed over.
    """
    checkpoint = Path(checkpoint)
    single = _single_checkpoint(checkpoint)
    for _ in range(5):  # a rotating run can remove what was listed: list again
        found = [checkpoint] if single else _found_under(checkpoint)
        if not found:
            break
        selection, gone = _held_and_verified(found)
        if single and gone:
            raise CheckpointError(f"{checkpoint} was removed before it could be read (a run rotating its checkpoints, "
                                  "train.keep_checkpoints); pass the run's output_dir to read its newest checkpoint")
        if selection.chosen is not None or not gone:
            break
    else:
        raise CheckpointError(f"the checkpoints under {checkpoint} kept disappearing while being read (a run rotating "
                              "them with a file system that has no flock?); rerun, or pass one iter_NNNNNNN folder")
    if not found:
        raise UserFileNotFoundError(
            f"{checkpoint} holds no dcd-train checkpoint (a directory with {META}); "
            "pass a run's output_dir, its checkpoints/ folder or one iter_NNNNNNN folder"
        )
    if selection.chosen is None:
        raise damaged_error(found[0].parent, selection, READ_FIX)
    for line in selection.fallback_lines():
        (say or log.warning)(line)
    if not hold:
        leases.release(selection.chosen)
    return selection.chosen


def _held_and_verified(found: list[Path]) -> tuple[Selection, bool]:
    """The newest of `found` that still exists once leased and verifies (held); whether any had vanished."""
    selection, gone = Selection(chosen=None), False
    for path in found:
        why_not = leases.take(path)
        if not path.is_dir():
            leases.release(path)
            gone = True
            continue
        problems = verify(path)
        if problems:
            leases.release(path)
            selection.rejected.append((path, problems))
            continue
        if why_not:
            log.warning("reading %s without a read lease (%s): a run still rotating checkpoints there could "
                        "remove it mid-read", path, why_not)
        selection.chosen = path
        break
    return selection, gone


def read_meta(checkpoint: Path) -> dict:
    """A verified checkpoint's meta.json record (the TrainConfig it was trained with as `config`)."""
    try:
        meta = json.loads((Path(checkpoint) / META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint}/{META} is unreadable ({type(exc).__name__}); restore it") from None
    if not isinstance(meta, dict) or not meta.get("config"):
        raise CheckpointError(f"{checkpoint}/{META} has no training config; it was not written by dcd-train")
    return meta


def read_checkpoint_config(checkpoint: Path, say: Callable[[str], None] | None = None, *, hold: bool = False):
    """(checkpoint dir, the TrainConfig it was trained with, its meta record), verified first (and held: `hold`)."""
    import yaml

    from dcd_megatron.configs import from_dict
    from dcd_megatron.configs.train import TrainConfig

    path = locate_verified(Path(checkpoint), say, hold=hold)
    meta = read_meta(path)
    return path, from_dict(TrainConfig, yaml.safe_load(meta["config"])), meta
