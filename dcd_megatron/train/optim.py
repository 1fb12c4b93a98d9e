"""megatron-core's optimizer (Adam, weight decay, clipping) and its LR/WD scheduler from OptimConfig."""

from __future__ import annotations

import torch

from dcd_megatron.configs.train import OptimConfig
from dcd_megatron.runtime.distributed import RuntimeFacts
from dcd_megatron.errors import ConfigError


def build_optimizer(optim: OptimConfig, model_chunks, *, params_dtype: str, facts: RuntimeFacts):
    """A MegatronOptimizer over the DDP-wrapped model chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    if optim.distributed_optimizer and facts.on_cpu:
        raise ConfigError(
            "optim.distributed_optimizer=true needs CUDA (megatron-core asserts CUDA parameters); "
            "set optim.distributed_optimizer=false on CPU"
        )
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=params_dtype == "bf16",
        fp16=params_dtype == "fp16",
        params_dtype=torch.float32,
        use_distributed_optimizer=optim.distributed_optimizer,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(optim: OptimConfig, optimizer, total_steps: int):
    """Linear warm-up to `lr`, then decay to `min_lr` by the last step; one tick per step."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
