"""Make megatron-core run on a CPU-only machine (gloo), so laptops and CI use the real code path.

megatron-core is CUDA-first: it asks ``torch.cuda`` for the current device and RNG state,
builds a few tensors with a hard-coded ``device="cuda"``, and asserts CUDA tensor types in
gradient clipping. Each fix below is one ``Patch``: what it changes, why, and a ``probe``
that runs the smallest piece of megatron-core that needs it. ``apply()`` installs the
patches only when CUDA is absent; ``tests/test_cpu_compat.py`` checks, for the installed
megatron-core, that every probe fails without its patch (still needed) and passes with all
patches (still working).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
import shutil
import types
from typing import Callable

import torch

_CPU = torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class Patch:
    """One reversible change to torch/megatron-core, with a probe that exercises it."""

    name: str
    why: str
    install: Callable[[], Callable[[], None]]  # returns an undo function
    probe: Callable[[], None]  # raises when the code path does not work on CPU
    applies: Callable[[], bool] = lambda: True  # whether this megatron-core version needs it
    probe_ranks: int = 1  # the probe runs on this many ranks, as that many pipeline stages


_undo_stack: list[Callable[[], None]] = []
_applied: set[str] = set()


def _set_attr(obj, name: str, value) -> Callable[[], None]:
    """setattr that returns its own undo."""
    missing = object()
    old = obj.__dict__.get(name, missing) if hasattr(obj, "__dict__") else getattr(obj, name, missing)

    def undo():
        if old is missing:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        else:
            setattr(obj, name, old)

    setattr(obj, name, value)
    return undo


def _chain(undos: list[Callable[[], None]]) -> Callable[[], None]:
    def undo():
        for u in reversed(undos):
            u()

    return undo


# --------------------------------------------------------------------------------------
# 1. torch.cuda.current_device() -> the CPU device
# --------------------------------------------------------------------------------------
def _install_current_device():
    return _set_attr(torch.cuda, "current_device", lambda: _CPU)


def _probe_current_device():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    RotaryEmbedding(kv_channels=8, rotary_percent=1.0)(4)


# --------------------------------------------------------------------------------------
# 2. CUDA RNG helpers (model-parallel RNG tracker) -> the CPU generator
# --------------------------------------------------------------------------------------
def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


class _SameGeneratorFilter(logging.Filter):
    """On CPU the 'CUDA' and CPU generators are one, so megatron's drift warning is noise."""

    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _install_rng():
    from megatron.core.tensor_parallel import random as mrandom

    log_filter = _SameGeneratorFilter()
    logging.getLogger(mrandom.__name__).addFilter(log_filter)
    undos = [
        lambda: logging.getLogger(mrandom.__name__).removeFilter(log_filter),
        _set_attr(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state()),
        _set_attr(torch.cuda, "set_rng_state", lambda s, device="cuda": torch.set_rng_state(s)),
        _set_attr(torch.cuda, "manual_seed", lambda seed: torch.manual_seed(seed)),
        _set_attr(mrandom, "_get_cuda_rng_state", _cpu_get_rng_state),
        _set_attr(mrandom, "_set_cuda_rng_state", _cpu_set_rng_state),
    ]
    return _chain(undos)


def _probe_rng():
    from megatron.core import tensor_parallel

    tensor_parallel.random.initialize_rng_tracker(force_reset=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.add("dcd-probe", 1234)
    with tracker.fork("dcd-probe"):
        torch.rand(1)
    tensor_parallel.random.initialize_rng_tracker(force_reset=True)


# --------------------------------------------------------------------------------------
# 3. Hard-coded device="cuda" tensor factories -> CPU, inside the modules that use them
# --------------------------------------------------------------------------------------
_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "empty_like", "zeros_like")

# Modules whose own `torch.<factory>(..., device="cuda")` calls are remapped.
FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.rerun_state_machine",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.exchange_utils",
)


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int)  # a bare CUDA ordinal


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = _CPU
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorch(types.ModuleType):
    """`torch`, except that the tensor factories map a CUDA device to the CPU."""

    def __init__(self):
        super().__init__("torch")
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _install_factories():
    proxy = _CpuTorch()
    undos = []
    for modname in FACTORY_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # a module another megatron-core version does not have
            continue
        if getattr(mod, "torch", None) is torch:
            undos.append(_set_attr(mod, "torch", proxy))
    return _chain(undos)


def _probe_factories():
    """A per-token-loss step of megatron-core's no-pipelining schedule."""
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=1,
        calculate_per_token_loss=True,
        pipeline_dtype=torch.float32,
    )
    model = torch.nn.Linear(2, 1)
    model.config = config
    model.model_type = ModelType.encoder_or_decoder
    model.set_input_tensor = lambda _: None

    def step(data_iterator, m):
        out = m(next(data_iterator))
        return out, lambda o: (o.sum(), torch.tensor(1, dtype=torch.int), {})

    forward_backward_no_pipelining(
        forward_step_func=step,
        data_iterator=iter([torch.ones(1, 2)]),
        model=[model],
        num_microbatches=1,
        seq_length=1,
        micro_batch_size=1,
    )


# --------------------------------------------------------------------------------------
# 4. Gradient clipping asserts `torch.cuda.FloatTensor` grads -> a CPU-tolerant copy
# --------------------------------------------------------------------------------------
def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron-core's clip_grad_by_total_norm_fp32 without its CUDA type assertion."""
    from megatron.core.utils import to_local_if_dtensor

    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = []
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            if grad.dtype != torch.float32 and not use_decoupled_grad:
                raise TypeError(f"gradient clipping expects fp32 main grads, got {grad.dtype}")  # internal
            grads.append(to_local_if_dtensor(grad).detach())
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def _install_clip():
    from megatron.core.optimizer import clip_grads, optimizer

    undos = [_set_attr(clip_grads, "clip_grad_by_total_norm_fp32", _cpu_clip_grad_by_total_norm_fp32)]
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        undos.append(
            _set_attr(optimizer, "clip_grad_by_total_norm_fp32", _cpu_clip_grad_by_total_norm_fp32)
        )
    return _chain(undos)


def _probe_clip():
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 10.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=float(p.grad.norm()))
    if not torch.allclose(p.grad.norm(), torch.tensor(1.0), atol=1e-4):
        raise AssertionError(f"clipping gave norm {float(p.grad.norm())}, expected 1.0")


# --------------------------------------------------------------------------------------
# 5. CUDA streams (megatron-core >= 0.17 DDP grad sync) -> no-op stand-ins
# --------------------------------------------------------------------------------------
class _NullStream:
    """Stands in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return None


def _install_streams():
    null = _NullStream()
    undos = [
        _set_attr(torch.cuda, "current_stream", lambda device=None: null),
        _set_attr(torch.cuda, "default_stream", lambda device=None: null),
        _set_attr(torch.cuda, "Stream", _NullStream),
        _set_attr(torch.cuda, "stream", lambda s=None: contextlib.nullcontext()),
    ]
    return _chain(undos)


def _probe_streams():
    """A gradient all-reduce through megatron-core's DDP wrapper."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), torch.nn.Linear(2, 1))
    ddp(torch.ones(1, 2)).sum().backward()
    ddp.start_grad_sync()
    ddp.finish_grad_sync()


# --------------------------------------------------------------------------------------
# 6. torch.cuda.synchronize() (distributed checkpoint saving) -> no-op
# --------------------------------------------------------------------------------------
def _install_synchronize():
    return _set_attr(torch.cuda, "synchronize", lambda device=None: None)


def _probe_synchronize():
    """A megatron-core distributed checkpoint save and load of one sharded tensor."""
    import tempfile

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    tensor = torch.arange(4.0)
    dist = torch.distributed
    box = [tempfile.mkdtemp(prefix="dcd-probe-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)  # every rank must write into the same directory
    try:
        dist_checkpointing.save({"t": ShardedTensor.from_rank_offsets("t", tensor)}, box[0])
        loaded = dist_checkpointing.load(
            {"t": ShardedTensor.from_rank_offsets("t", torch.empty(4))}, box[0]
        )
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(box[0], ignore_errors=True)
    if not torch.equal(loaded["t"], tensor):
        raise AssertionError("distributed checkpoint round trip changed the tensor")


# --------------------------------------------------------------------------------------
# 7. Tensor.cuda() (tied embeddings across pipeline stages) -> the tensor itself
# --------------------------------------------------------------------------------------
def _cpu_tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    """Tensor.cuda() without CUDA: the tensor stays where it is (on the CPU)."""
    return self


def _install_tensor_cuda():
    return _set_attr(torch.Tensor, "cuda", _cpu_tensor_cuda)


def _probe_tensor_cuda():
    """A GPTModel with tied embeddings split over two pipeline stages (first and last copy synced).

    Needs a world of two ranks in pipeline-parallel size 2; it is a no-op on a single stage.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    if parallel_state.get_pipeline_model_parallel_world_size() < 2:
        raise RuntimeError("this probe needs pipeline-parallel size >= 2")
    config = TransformerConfig(
        num_layers=2, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True,
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
    )
    GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=16, max_sequence_length=8,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=True,
    )


def _megatron_at_least(version: str) -> bool:
    from packaging.version import Version

    from megatron.core.package_info import __version__

    return Version(__version__) >= Version(version)


PATCHES: tuple[Patch, ...] = (
    Patch(
        "current_device",
        "megatron-core places tensors on torch.cuda.current_device(), which raises without CUDA",
        _install_current_device,
        _probe_current_device,
    ),
    Patch(
        "cuda_rng",
        "the model-parallel RNG tracker reads and writes CUDA generator state",
        _install_rng,
        _probe_rng,
    ),
    Patch(
        "cuda_factories",
        "schedules/optimizer/DDP/checkpointing build tensors with a hard-coded device='cuda'",
        _install_factories,
        _probe_factories,
    ),
    Patch(
        "clip_grads",
        "clip_grad_by_total_norm_fp32 asserts grad.type() == 'torch.cuda.FloatTensor'",
        _install_clip,
        _probe_clip,
    ),
    Patch(
        "cuda_streams",
        "DDP's start_grad_sync (megatron-core >= 0.17) calls torch.cuda.current_stream()",
        _install_streams,
        _probe_streams,
        applies=lambda: _megatron_at_least("0.17"),
    ),
    Patch(
        "cuda_synchronize",
        "distributed checkpoint saving calls torch.cuda.synchronize() before writing",
        _install_synchronize,
        _probe_synchronize,
    ),
    Patch(
        "tensor_cuda",
        "tied embeddings over pipeline stages move the shared weight with Tensor.cuda() before syncing it",
        _install_tensor_cuda,
        _probe_tensor_cuda,
        probe_ranks=2,
    ),
)


def needs_patches() -> bool:
    """True when megatron-core must be patched: this process has no usable CUDA device."""
    return not torch.cuda.is_available()


def apply(only: tuple[str, ...] | None = None) -> list[str]:
    """Install the CPU patches (idempotent) when CUDA is absent; return the names installed.

    ``only`` restricts to a subset (the compat test uses it to show each patch is needed).
    """
    if not needs_patches():
        return []
    installed = []
    for patch in PATCHES:
        if patch.name in _applied or (only is not None and patch.name not in only):
            continue
        if not patch.applies():
            continue
        _undo_stack.append(patch.install())
        _applied.add(patch.name)
        installed.append(patch.name)
    return installed


def remove() -> None:
    """Undo every installed patch (for tests)."""
    while _undo_stack:
        _undo_stack.pop()()
    _applied.clear()


def applied() -> frozenset[str]:
    """Names of the patches installed in this process."""
    return frozenset(_applied)
