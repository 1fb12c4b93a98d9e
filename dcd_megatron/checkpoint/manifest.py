"""Every checkpoint's `manifest.json`: its files with sizes and sha256, written last, checked before a load.

A truncated shard, a deleted `.metadata` or `common.pt`, a half-written `meta.json` or a missing
RNG file is named before megatron-core reads a byte, so the caller can fall back to an older
checkpoint instead of failing deep inside a load. Hashing is split over the ranks that wrote
the checkpoint (file i by rank i % world), so a large checkpoint is hashed in parallel.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = 1

# (rank, world): which share of the files this process hashes; `gather` merges the shares.
Part = tuple[int, int]


def _files(directory: Path) -> list[str]:
    """Every entry below `directory` but the manifest, as sorted relative paths (links included)."""
    found = []
    for top, dirs, names in os.walk(directory, followlinks=False):
        for name in names + [d for d in dirs if (Path(top) / d).is_symlink()]:
            rel = (Path(top) / name).relative_to(directory).as_posix()
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def record_file(directory: Path, rel: str) -> dict:
    """One file's manifest entry: {size, sha256}."""
    path = directory / rel
    return {"size": path.stat().st_size, "sha256": _digest(path)}


def _share(names: list[str], part: Part) -> list[str]:
    rank, world = part
    return [name for i, name in enumerate(names) if i % world == rank]


def hash_share(directory: Path, part: Part = (0, 1)) -> dict:
    """This process's share of the manifest: {relative path: {size, sha256}}."""
    directory = Path(directory)
    return {rel: record_file(directory, rel) for rel in _share(_files(directory), part)}


def write_manifest(directory: Path, files: dict | None = None) -> None:
    """Write `manifest.json` (atomically) for `files` (the merged shares), or hash everything here."""
    directory = Path(directory)
    files = hash_share(directory) if files is None else files
    text = json.dumps({"format": FORMAT, "files": dict(sorted(files.items()))}, indent=1)
    tmp = directory / (MANIFEST + ".part")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST)


def fingerprint(directory: Path) -> str:
    """A short content identity of a checkpoint: its folder name and the sha256 of its manifest
    (which holds every file's sha256), so a copy has the same identity and a re-save another."""
    digest = hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest()[:16]
    return f"{Path(directory).name}@{digest}"


def read_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """(files, None), or (None, why the manifest cannot be read)."""
    path = Path(directory) / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None, f"{MANIFEST} is missing (not written by this dcd-megatron, or damaged)"
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")  # internal
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{MANIFEST} is unreadable ({type(exc).__name__})"
    return files, None


def _problem(directory: Path, rel: str, want: dict, checksums: bool) -> str | None:
    path = directory / rel
    if path.is_symlink():
        return f"{rel} is a symbolic link"
    if not path.is_file():
        return f"{rel} is missing"
    size = path.stat().st_size
    if size != want.get("size"):
        return f"{rel} is {size} bytes, the manifest says {want.get('size')} (truncated or rewritten)"
    if checksums and _digest(path) != want.get("sha256"):
        return f"{rel} does not match its sha256 (damaged)"
    return None


def verify(
    directory: Path, part: Part = (0, 1), gather: Callable[[list], list] | None = None, checksums: bool = True
) -> list[str]:
    """What is wrong with the checkpoint at `directory` (empty: it is intact).

    With `part` and `gather` (every rank calls it with its list; it returns all ranks' lists
    joined), each rank checks its share of the files and all ranks get the same answer.
    """
    directory = Path(directory)
    files, why = read_manifest(directory)
    if why:
        return [why]
    links = [f"{rel} is a symbolic link" for rel in _files(directory) if (directory / rel).is_symlink()]
    mine = [
        problem for rel in _share(sorted(files), part)
        if (problem := _problem(directory, rel, files[rel], checksums))
    ]
    found = gather(mine) if gather else mine
    return sorted(set(links + found))


def merge_shares(shares: list[dict]) -> dict:
    """The manifest's files from every rank's `hash_share`."""
    merged = {}
    for share in shares:
        merged.update(share)
    return merged
