"""Start the process group and megatron-core's parallel state (gloo on CPU, NCCL on GPU).

Ranks come from torchrun's variables, or from Slurm's when launched as one srun task per rank.
Only this module (and cpu_compat) knows that megatron-core is CUDA-first: the rest of the
package gets one `RuntimeFacts` (the device, whether Transformer Engine is there) and asks it.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

from dcd_megatron.runtime import cpu_compat
from dcd_megatron.runtime.layout import Layout
from dcd_megatron.errors import ConfigError, UserError


class DistributedSetupError(UserError, RuntimeError):
    """The launch environment cannot run as asked (no MASTER_ADDR, no GPU for runtime.device=cuda)."""


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def process_info(env: dict[str, str] | None = None) -> ProcessInfo:
    """Rank/world from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or Slurm (SLURM_PROCID, ...)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    if world > 1 and "MASTER_ADDR" not in env:
        raise DistributedSetupError(
            f"rank {rank} of {world}: MASTER_ADDR is not set; launch with torchrun, or export "
            "MASTER_ADDR/MASTER_PORT before srun (slurm/dcd_8node.sh does)"
        )
    return ProcessInfo(
        rank=rank,
        world_size=world,
        local_rank=local,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", "29500")),
    )


def resolve_device(requested: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU is a clear error."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"runtime.device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DistributedSetupError("runtime.device=cuda but no CUDA device is visible; use runtime.device=cpu")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def has_transformer_engine() -> bool:
    """Whether Transformer Engine imports (it needs CUDA; it never installs on the CPU machines)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class RuntimeFacts:
    """Where this process runs, as megatron-core needs to know it."""

    device: torch.device
    has_te: bool  # Transformer Engine imports and the device is CUDA: the TE layer spec, FP8

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"


def runtime_facts(requested: str | torch.device = "auto", *, use_te: bool | None = None) -> RuntimeFacts:
    """The facts for `requested` (auto / cpu / cuda, or a device); Transformer Engine is looked for
    on CUDA unless `use_te` says whether to use it."""
    device = requested if isinstance(requested, torch.device) else resolve_device(requested)
    if use_te is None:
        use_te = device.type == "cuda" and has_transformer_engine()
    return RuntimeFacts(device=device, has_te=bool(use_te))


def local_ranks(world_size: int) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, else the world (at most one a core)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or min(world_size, os.cpu_count() or 1)


def set_threads(num_threads: int = 0, world_size: int = 1) -> int:
    """torch intra-op threads: `num_threads`, or (0) this node's cores shared by its ranks; returns it."""
    threads = num_threads or max(1, (os.cpu_count() or 1) // max(local_ranks(world_size), 1))
    torch.set_num_threads(threads)
    return threads


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(device: torch.device, timeout_minutes: int = 30) -> ProcessInfo:
    """Initialise torch.distributed once (gloo on CPU, nccl on CUDA) and pin the local GPU."""
    info = process_info()
    if device.type == "cpu":
        cpu_compat.apply()
    else:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        if info.world_size == 1 and "MASTER_PORT" not in os.environ:
            # One process and no launcher: a free port, so two local runs never collide, and
            # nothing written to os.environ for later subprocesses to inherit.
            init_method = f"tcp://127.0.0.1:{free_port()}"
        else:
            os.environ.setdefault("MASTER_ADDR", info.master_addr)
            os.environ.setdefault("MASTER_PORT", str(info.master_port))
            init_method = "env://"
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=init_method,
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return info


def ensure_single_process_group(device: torch.device) -> None:
    """A one-rank process group and megatron parallel state, unless already initialised."""
    from megatron.core import parallel_state

    if device.type == "cpu":
        cpu_compat.apply()
    if not torch.distributed.is_initialized():
        # An explicit init_method, not MASTER_ADDR/PORT: subprocesses started later copy
        # os.environ and must not be told to rendezvous on the port this group holds.
        torch.distributed.init_process_group(
            "gloo" if device.type == "cpu" else "nccl",
            init_method=f"tcp://127.0.0.1:{free_port()}",
            rank=0,
            world_size=1,
        )
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(Layout(1, 1, 1, 1), seed=0)


def destroy_subgroups() -> int:
    """Destroy every process group but the default one; returns how many.

    megatron-core's ``destroy_model_parallel`` only forgets its groups: torch keeps them (and
    each gloo group's threads) alive, so a process that trains again and again (the drift lab's
    workers) gained ~50 threads a run and slowed down with them.
    """
    from torch.distributed import distributed_c10d as c10d

    if not torch.distributed.is_initialized():
        return 0
    default = c10d._get_default_group()
    groups = [pg for pg in list(c10d._world.pg_map) if pg is not default]
    for pg in groups:
        torch.distributed.destroy_process_group(pg)
    return len(groups)


def init_model_parallel(layout: Layout, seed: int) -> None:
    """megatron-core's parallel groups for the layout, and its model-parallel RNG streams."""
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
        destroy_subgroups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's megatron-core process groups and its place in them (after `init_model_parallel`)."""

    tp: object  # tensor-parallel group
    cp: object  # context-parallel group
    dp: object  # data-parallel group
    dp_cp: object  # data x context parallel group (the loss's global normalisation)
    pp: object  # pipeline group
    first_stage: bool
    last_stage: bool
    tp_rank: int
    cp_rank: int
    dp_rank: int
    # The global rank whose metrics every rank receives: the last one sits on the last pipeline
    # stage (megatron's default rank order puts pp outermost; Megatron-LM logs from it too).
    # get_pipeline_model_parallel_last_rank() differs per PP group and deadlocks at DP > 1.
    metrics_rank: int


def parallel_groups() -> ParallelGroups:
    """megatron-core's groups of this rank, read once."""
    from megatron.core import parallel_state as ps

    return ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(),
        cp=ps.get_context_parallel_group(),
        dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        pp=ps.get_pipeline_model_parallel_group(),
        first_stage=ps.is_pipeline_first_stage(),
        last_stage=ps.is_pipeline_last_stage(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        metrics_rank=torch.distributed.get_world_size() - 1,
    )


def share_object(obj, src: int):
    """`obj` as global rank `src` has it, on every rank (one broadcast)."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_lists(items: list) -> list:
    """Every rank's `items`, joined in rank order, on every rank (one all-gather; a plain copy alone)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return list(items)
    boxes = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(boxes, list(items))
    return [item for box in boxes for item in box]


def shutdown() -> None:
    """Tear down parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
