"""Run a function on N gloo ranks in fresh processes and collect each rank's return value.

Used by every multi-process test: the function must live at module level (it is pickled by
name for ``spawn``) and take ``(rank, world_size, *args)``. A failure on any rank fails the
test with that rank's traceback; a hang fails it after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import traceback

import torch
import torch.multiprocessing as mp

from dcd_megatron.runtime.distributed import free_port


def _worker(rank, world_size, port, fn, args, out_queue, patch):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        from dcd_megatron.runtime import cpu_compat

        if patch:
            cpu_compat.apply()
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Plain pickle bytes: the queue's own pickler would share tensors through this
        # process's file descriptors, gone once it exits before the parent reads them.
        out_queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report every failure, including assertion errors
        out_queue.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            try:
                from megatron.core import parallel_state

                parallel_state.destroy_model_parallel()
            except Exception:
                pass
            torch.distributed.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 420, patch: bool = True) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results by rank.

    ``patch`` installs the CPU patches for megatron-core in each rank before ``fn`` runs.
    """
    ctx = mp.get_context("spawn")
    out_queue = ctx.Queue()
    port = free_port()
    # Not daemonic: megatron's checkpoint writer starts processes of its own inside a rank.
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, out_queue, patch))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    failures: list[str] = []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = out_queue.get(timeout=timeout)
            except queue_mod.Empty:
                failures.append(f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(results))}")
                break
            if ok:
                results[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank} failed:\n{value}")
                break  # the other ranks are likely blocked in a collective
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[r] for r in range(world_size)]
