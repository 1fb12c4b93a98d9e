"""Saving and loading with megatron-core's distributed checkpointing, atomically and verified.

A checkpoint is written into `iter_NNNNNNN.tmp`, completed with `meta.json` and then
`manifest.json` (every file's size and sha256, hashed by all ranks in parallel), and only then
renamed to `iter_NNNNNNN`; `latest` names the newest. A run killed mid-save leaves a `.tmp`
directory that is never taken as a checkpoint (and is removed by the next save). A foreign
entry in the way (a link or file under a checkpoint's name) is moved aside, never followed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dcd_megatron.checkpoint import leases
from dcd_megatron.checkpoint.finding import (
    META, CheckpointError, checkpoint_dir, complete_checkpoints, is_ours, move_aside, read_meta,
)
from dcd_megatron.checkpoint.manifest import hash_share, merge_shares, record_file, verify, write_manifest
from dcd_megatron.runtime.distributed import all_gather_lists
from dcd_megatron.tracking.redact import redact

log = logging.getLogger(__name__)

def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model_chunks, optimizer, is_loading: bool) -> dict:
    """Model and optimizer sharded state dicts (model chunks unwrapped from DDP)."""
    state = {}
    model_sd = {}
    for i, chunk in enumerate(model_chunks):
        module = getattr(chunk, "module", chunk)
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        state[key] = module.sharded_state_dict()
        model_sd.update(state[key])
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
    return state


def use_in_process_write_results() -> bool:
    """Give megatron's checkpoint writer a plain in-process results queue (synchronous saves only).

    Unset, megatron-core starts a multiprocessing Manager (a spawned interpreter) for it: the
    first save then waits about 4 s while that process imports torch to unpickle the results,
    and exit waits for its shutdown. The Manager exists for async saves, whose writer runs in
    another process; every save here is synchronous, so the writer and the reader of the queue
    are this process. Returns False (megatron's default stays) if megatron-core lays this out
    differently.
    """
    import queue

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return False
    if getattr(filesystem_async, "_results_queue", "absent") is None:
        filesystem_async._results_queue = queue.Queue()
    return isinstance(getattr(filesystem_async, "_results_queue", None), queue.Queue)


def start_writer_helpers(ignoring: tuple = ()) -> None:
    """Start megatron's checkpoint-writer Manager process now, with the `ignoring` signals ignored.

    Slurm's `--signal` and `scancel --signal` reach every process of a job step; the Manager
    (spawned at the first save) would die of SIGUSR1 and fail the very checkpoint the signal
    asks for. Ignored signals stay ignored across exec, so the spawned process keeps them off.
    Not needed (and not started) where the writer gets an in-process queue instead.
    """
    import signal

    if use_in_process_write_results():
        return
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    start = getattr(filesystem_async, "get_write_results_queue", None) or getattr(
        filesystem_async, "_get_write_results_queue", None
    )
    if start is None:
        return
    try:
        saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in ignoring}
    except ValueError:  # not the main thread: the handlers are not ours to set either
        return
    try:
        start()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _clear_the_way(root: Path, final: Path, tmp: Path) -> None:
    """Rank 0, before a save: stale .tmp dirs of ours go, a re-saved step's old dir goes, links move aside."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("iter_*.tmp"):
        if stale.is_symlink() or not stale.is_dir():
            move_aside(stale, "foreign")
        else:
            shutil.rmtree(stale, ignore_errors=True)
    if final.is_symlink() or (final.exists() and not is_ours(final)):
        move_aside(final, "foreign")
    elif final.exists():  # a re-save of the same step (e.g. resumed at the end, or after a damaged one)
        shutil.rmtree(final)
    tmp.mkdir(parents=True)


class CheckpointSaveError(CheckpointError):
    """A save failed (a full or failing disk, most often); the previous checkpoint is intact and named."""


def save_checkpoint(root: Path, step: int, model_chunks, optimizer, scheduler, meta: dict, keep: int) -> Path:
    """Save everything needed to resume exactly at `step`; collective over all ranks.

    A failure on any rank (a full disk mid-run) fails the save on every rank with one
    `CheckpointSaveError`: the `.tmp` directory is removed and the newest older checkpoint,
    untouched by the failed save, is verified and named in the message.
    """
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    failed = _agreed_failure(_attempt(lambda: _clear_the_way(root, final, tmp)) if rank == 0 else None)
    if failed is None:
        failed = _agreed_failure(_attempt(lambda: _write_shards(tmp, model_chunks, optimizer, rank)))
    if failed is None:
        share: list = []
        failed = _agreed_failure(_attempt(lambda: share.append(hash_share(tmp, (rank, world)))))
    if failed is None:
        shares = all_gather_lists(share)
        done = _attempt(lambda: _complete(root, tmp, final, shares, meta, step, scheduler, world)) if rank == 0 else None
        failed = _agreed_failure(done)
    if failed is not None:  # rank 0 cleans up and checks the previous checkpoint; every rank says the same
        line = _save_failure_line(root, step, tmp, failed) if rank == 0 else None
        raise CheckpointSaveError(all_gather_lists([line])[0])
    if rank == 0:
        _after_save(root, final, keep)
    dist.barrier()
    return final


def _attempt(fn) -> str | None:
    """Run `fn`; None, or its failure in one line (the OSError's path and reason, or the exception's first line)."""
    try:
        fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch's CheckpointException is a BaseException; OSError and the rest say the same
        return _one_line(exc)
    return None


def _one_line(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)  # torch's CheckpointException: {rank: the exception it had}
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        exc = first[0] if isinstance(first, tuple) else first
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _agreed_failure(mine: str | None) -> str | None:
    """Every rank's view of one save phase: the first failure any rank had (or None), on all ranks."""
    views = all_gather_lists([mine])
    return next((f"rank {r}: {v}" if len(views) > 1 else v for r, v in enumerate(views) if v), None)


def _write_shards(tmp: Path, model_chunks, optimizer, rank: int) -> None:
    from megatron.core import dist_checkpointing

    use_in_process_write_results()
    dist_checkpointing.save(_sharded_state(model_chunks, optimizer, is_loading=False), str(tmp))
    rng_dir = tmp / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng_dir / f"rank_{rank:05d}.pt")


def _complete(root: Path, tmp: Path, final: Path, shares, meta: dict, step: int, scheduler, world: int) -> None:
    """Rank 0: meta.json and the manifest into `tmp`, then the rename that makes it a checkpoint."""
    # redacted: a checkpoint is copied and shared, its config must hold no password or token
    record = redact(dict(meta, step=step, scheduler=scheduler.state_dict(), world_size=world))
    _write_atomic(tmp / META, json.dumps(record, indent=1, default=str))
    files = merge_shares(shares)
    files[META] = record_file(tmp, META)
    write_manifest(tmp, files)
    os.replace(tmp, final)


def _after_save(root: Path, final: Path, keep: int) -> None:
    """Rank 0, the checkpoint in place: `latest` names it (a hint only), old ones go unless a reader holds them."""
    try:
        _write_atomic(root / "latest", final.name)
    except OSError as exc:
        log.warning("saved %s but could not update %s/latest (%s); readers find checkpoints without it",
                    final, root, _one_line(exc))
    if keep <= 0:
        return
    for old in complete_checkpoints(root)[:-keep]:
        if not leases.remove_unless_read(old):
            log.warning("kept %s for now: a reader (dcd-eval, dcd-convert, dcd-score, init_checkpoint) holds it; "
                        "a later save removes it", old.name)


def _save_failure_line(root: Path, step: int, tmp: Path, failure: str) -> str:
    """Rank 0: the one line a failed save ends the run with (what failed, what was kept, the fix)."""
    shutil.rmtree(tmp, ignore_errors=True)  # frees what the failed save took
    previous = next((p for p in reversed(complete_checkpoints(root)) if p.name != tmp.name.removesuffix(".tmp")), None)
    kept, room = "no earlier checkpoint exists", ""
    if previous is not None:
        kept = f"{previous.name} is intact and verifies" if not verify(previous) else f"{previous.name} does not verify"
        try:
            free, size = shutil.disk_usage(root).free, _size(previous)
            room = f"; {free / 2**20:.1f} MiB free there" + (
                f", less than one checkpoint ({size / 2**20:.1f} MiB): the disk is full" if free < size else "")
        except OSError:
            pass
    return (f"saving the checkpoint of step {step} under {root} failed ({failure}{room}); {kept}; free space or "
            "point train.output_dir at a disk with room, then rerun with train.resume=auto")


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file() and not f.is_symlink())


def load_checkpoint(path: Path, model_chunks, optimizer, scheduler, *, load_optimizer: bool = True) -> dict:
    """Restore model (and optimizer, scheduler, RNG) from a verified checkpoint at `path`; its meta record."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = read_meta(path)
    opt = optimizer if load_optimizer else None
    try:
        state = dist_checkpointing.load(_sharded_state(model_chunks, opt, is_loading=True), str(path))
    except Exception as exc:  # after verification: a layout or format megatron-core cannot read
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise CheckpointError(
            f"megatron-core cannot load {path} ({type(exc).__name__}: {first}); it verified, so the config does "
            "not fit it: resume with the model and parallel sections it was saved with (its meta.json)"
        ) from exc
    for i, chunk in enumerate(model_chunks):
        module = getattr(chunk, "module", chunk)
        module.load_state_dict(state["model" if len(model_chunks) == 1 else f"model{i}"])
    if opt is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
        _restore_rng(path, meta)
    return meta


def _restore_rng(path: Path, meta: dict) -> None:
    """This rank's RNG state, when the checkpoint was written by as many ranks (else a note)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if meta.get("world_size") != world:
        if rank == 0:
            print(f"note: {path} was written by {meta.get('world_size')} ranks and this run has {world}: "
                  "the random state (dropout) starts afresh; the data order does not change", flush=True)
        return
    rng_file = path / "rng" / f"rank_{rank:05d}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file} is missing; restore it, or resume from another checkpoint")
    _set_rng_state(torch.load(rng_file, weights_only=False))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    with open(tmp) as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
