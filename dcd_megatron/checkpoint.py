"""Checkpoints with megatron-core's distributed checkpointing: written atomically, found, read back.

A checkpoint is written into `iter_NNNNNNN.tmp`, completed with `meta.json` (written last), and
only then renamed to `iter_NNNNNNN`; `latest` names the newest. A run killed mid-save leaves a
`.tmp` directory that is never taken as a checkpoint (and is removed by the next save).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

_NAME = re.compile(r"^iter_(\d{7})$")
META = "meta.json"


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint (the `latest` pointer if valid, else a scan)."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _NAME.match(candidate.name) and (candidate / META).is_file():
            newer = complete_checkpoints(root)
            return newer[-1] if newer else candidate
    found = complete_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`auto`: latest complete checkpoint under root (or None); `never`: None; else that path."""
    if resume == "never":
        return None
    if resume == "auto":
        return find_latest(root)
    path = Path(resume)
    if (path / META).is_file():
        return path
    latest = find_latest(path)
    if latest is None:
        raise FileNotFoundError(
            f"train.resume={resume}: no complete checkpoint there (a complete one has {META}); "
            "use train.resume=auto or never"
        )
    return latest


def read_checkpoint_config(checkpoint: Path):
    """(checkpoint dir, the TrainConfig it was trained with, its meta record)."""
    import yaml

    from dcd_megatron.configs import from_dict
    from dcd_megatron.configs.train import TrainConfig

    checkpoint = Path(checkpoint)
    if not (checkpoint / META).is_file():
        latest = find_latest(checkpoint) or find_latest(checkpoint / "checkpoints")
        if latest is None:
            raise FileNotFoundError(
                f"{checkpoint} holds no complete dcd-train checkpoint (a directory with {META}); "
                "pass a run's output_dir, its checkpoints/ folder or one iter_NNNNNNN folder"
            )
        checkpoint = latest
    meta = json.loads((checkpoint / META).read_text())
    if not meta.get("config"):
        raise ValueError(f"{checkpoint}/{META} has no training config; it was not written by dcd-train")
    return checkpoint, from_dict(TrainConfig, yaml.safe_load(meta["config"])), meta


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


def save_checkpoint(root: Path, step: int, model_chunks, optimizer, scheduler, meta: dict, keep: int) -> Path:
    """Save everything needed to resume exactly at `step`; collective over all ranks."""
    from megatron.core import dist_checkpointing

    dist = torch.distributed
    rank = dist.get_rank()
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a re-save of the same step (e.g. resumed at the end)
            shutil.rmtree(final)
        tmp.mkdir(parents=True)
    dist.barrier()
    use_in_process_write_results()
    dist_checkpointing.save(_sharded_state(model_chunks, optimizer, is_loading=False), str(tmp))
    rng_dir = tmp / "rng"
    rng_dir.mkdir(exist_ok=True)
    torch.save(_rng_state(), rng_dir / f"rank_{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        record = dict(meta, step=step, scheduler=scheduler.state_dict(), world_size=dist.get_world_size())
        _write_atomic(tmp / META, json.dumps(record, indent=1, default=str))
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model_chunks, optimizer, scheduler, *, load_optimizer: bool = True) -> dict:
    """Restore model (and optimizer, scheduler, RNG) from `path`; return its meta record."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    meta = json.loads((path / META).read_text())
    opt = optimizer if load_optimizer else None
    state = dist_checkpointing.load(_sharded_state(model_chunks, opt, is_loading=True), str(path))
    for i, chunk in enumerate(model_chunks):
        module = getattr(chunk, "module", chunk)
        module.load_state_dict(state["model" if len(model_chunks) == 1 else f"model{i}"])
    if opt is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
        rank = torch.distributed.get_rank()
        rng_file = path / "rng" / f"rank_{rank:05d}.pt"
        if meta.get("world_size") == torch.distributed.get_world_size() and rng_file.is_file():
            _set_rng_state(torch.load(rng_file, weights_only=False))
    return meta


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    with open(tmp) as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
