"""What the benchmark scripts share: spawning gloo ranks, clocks, peak memory, the machine line
and rewriting one section of docs/performance.md.

The scripts run as ``python benchmarks/X.py``; each puts the repository root on ``sys.path``
and imports this module as ``benchmarks._harness`` (spawned ranks find it the same way).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import subprocess
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

from dcd_megatron.runtime.distributed import free_port

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, dense bf16 (NVIDIA datasheet): the default for MFU


def _rank_main(rank, world_size, port, threads, patch, fn, args, queue):
    """One spawned rank: join the gloo group, run ``fn(rank, args)``, send back its result or traceback."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(threads)
    try:
        if patch:
            from dcd_megatron.runtime import cpu_compat

            cpu_compat.apply()
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        queue.put((rank, fn(rank, args)))
        torch.distributed.destroy_process_group()
    except BaseException as exc:  # surface the failure in the parent
        queue.put((rank, traceback.format_exc()))
        raise SystemExit(1) from exc


def run_ranks(fn, world_size: int, args, *, threads: int, timeout: float, patch: bool) -> object:
    """Run module-level ``fn(rank, args)`` on ``world_size`` spawned gloo ranks; return rank 0's result.

    ``threads`` is torch's intra-op threads per rank; ``patch`` installs the CPU patches for
    megatron-core (``cpu_compat``) first. A failed rank raises with that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, threads, patch, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=timeout) for _ in range(world_size))
    for p in procs:
        p.join(timeout=60)
    for rank, value in got.items():
        if isinstance(value, str):
            raise RuntimeError(f"rank {rank} failed:\n{value}")
    return got[0]


@contextlib.contextmanager
def one_gpu_group():
    """A one-rank NCCL process group on GPU 0, so megatron's parallel state can exist (GPU mode)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def clocks(cuda: bool = False):
    """Time the block: the yielded dict gets ``cpu`` (process_time) and ``wall`` (perf_counter) seconds.

    With ``cuda`` the GPU is synchronised before both readings, so queued kernels are counted.
    """
    if cuda:
        torch.cuda.synchronize()
    out = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield out
    if cuda:
        torch.cuda.synchronize()
    out["cpu"], out["wall"] = time.process_time() - cpu, time.perf_counter() - wall


def summarize(cpu: dict, wall: dict) -> dict:
    """Per key: median CPU and wall seconds, and the fastest CPU time (other jobs only ever add time)."""
    return {
        "cpu": {k: statistics.median(v) for k, v in cpu.items()},
        "cpu_min": {k: min(v) for k, v in cpu.items()},
        "wall": {k: statistics.median(v) for k, v in wall.items()},
    }


def peak_bytes(fn) -> int:
    """Peak of torch's allocated bytes during ``fn()`` above the start (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def mib(n: float) -> str:
    """Bytes as whole MiB, for the tables."""
    return f"{n / 2**20:.0f}"


def machine() -> str:
    """CPU count, CPU model (lscpu) and torch version, for a section's "Machine:" line."""
    cpu = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"Model name:\s*(.+)", out)
        cpu = found.group(1).strip() if found else cpu
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{os.cpu_count()} CPU cores (`nproc`), {cpu}, torch {torch.__version__}"


def run_watched(run, args) -> tuple:
    """``run(args)``, with the load average before and after and the wall seconds it took.

    The machine is shared, so each section states the load its figures were taken under.
    """
    load_before, start = os.getloadavg()[0], time.perf_counter()
    result = run(args)
    elapsed = time.perf_counter() - start
    return result, (load_before, os.getloadavg()[0]), elapsed


def resolve_sizes(args, presets: dict) -> None:
    """Apply ``--preset``'s sizes over the parsed options and default ``--chunk`` to DCDConfig's."""
    if args.preset:
        for k, v in presets[args.preset].items():
            setattr(args, k, v)
    if args.chunk is None:
        from dcd_megatron.loss import DCDConfig

        args.chunk = DCDConfig().chunk_size


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace the section that starts with ``heading`` in ``path`` by ``text`` (or append it), and say so.

    The rest of the file is left alone, so each benchmark rewrites only its own figures.
    """
    old = path.read_text() if path.exists() else "# Performance\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)
    print(f"wrote the '{heading}' section of {path}")
