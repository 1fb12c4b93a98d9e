"""Build a megatron-core GPTModel (Llama/Qwen style) for this rank's pipeline stage.

The local layer spec runs everywhere (CPU included); the Transformer Engine spec is used when TE
imports on a GPU, and is required for FP8 and context parallelism.
"""

from __future__ import annotations

import torch

from dcd_megatron.model.config import ModelConfig
from dcd_megatron.runtime.distributed import RuntimeFacts
from dcd_megatron.runtime.layout import Layout
from dcd_megatron.errors import ConfigError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(model: ModelConfig, layout: Layout, *, sequence_parallel: bool, facts: RuntimeFacts):
    """megatron-core TransformerConfig for the model, layout and where it runs (`facts`)."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    dtype = _DTYPES[model.params_dtype]
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_size,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        init_method_std=model.init_method_std,
        attention_dropout=model.attention_dropout,
        hidden_dropout=model.hidden_dropout,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        pipeline_dtype=dtype,
        calculate_per_token_loss=True,
        use_cpu_initialization=facts.on_cpu,
        # megatron-core's defaults: its fused kernels need apex or TE builds; the unfused paths are exact.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        batch_p2p_sync=not facts.on_cpu,
    )
    if model.fp8 is not None:
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe)
    return TransformerConfig(**kwargs)


def layer_spec(use_te: bool):
    """Transformer Engine layer spec on GPU with TE, megatron-core's local spec otherwise."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_gpt_model(
    model: ModelConfig,
    config,
    *,
    padded_vocab_size: int,
    max_sequence_length: int,
    pre_process: bool,
    post_process: bool,
    use_te: bool,
):
    """The GPTModel for one pipeline stage, returning vocab-sharded logits on the last stage."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(use_te),
        vocab_size=padded_vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=model.rotary_percent,
        rotary_base=int(model.rotary_base),
    )


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    megatron-core's ``_reduce`` (the backward of ``copy_to_tensor_model_parallel_region``)
    all-reduces ``grad.contiguous()`` and returns ``grad``: on a non-contiguous gradient
    (GPTModel's ``[s, b] -> [b, s]`` transpose makes one) the reduction is silently lost.
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def return_hidden_states(model) -> None:
    """Make a (last-stage) GPTModel return its final hidden states ``[b, s, h]`` instead of logits.

    For the chunked DCD loss (``loss.chunk_size > 0``), which makes the logits itself a chunk
    at a time from these and ``output_weight(model)``. The output layer keeps its parameters
    (checkpoints are unchanged); its forward does to the input exactly what megatron's
    ``ColumnParallelLinear`` does before the matmul: the sequence-parallel all-gather
    (reduce-scatter of the gradient), or, with TP > 1, the copy to the tensor-parallel region
    (all-reduce of the gradient). A no-op on stages without an output layer.
    """
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    layer = getattr(model, "output_layer", None)
    if layer is None or not getattr(model, "post_process", False):
        return
    config = layer.config
    if getattr(config, "mtp_num_layers", None):
        raise ConfigError("the chunked DCD loss does not support multi-token prediction; set loss.chunk_size=0")
    if getattr(config, "defer_embedding_wgrad_compute", False):
        raise ConfigError("the chunked DCD loss computes the output-layer weight gradient itself; "
                         "unset defer_embedding_wgrad_compute or set loss.chunk_size=0")

    def forward(input_, weight=None, runtime_gather_output=None):
        if layer.sequence_parallel:
            out = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=layer.tp_group)
        elif layer.allreduce_dgrad:
            out = copy_to_tensor_model_parallel_region(input_, group=layer.tp_group)
        else:
            return input_, None
        return _ContiguousGrad.apply(out), None

    layer.forward = forward  # the instance attribute shadows ColumnParallelLinear.forward
    model.returns_hidden_states = True


def output_weight(model):
    """The ``[V/tp, h]`` weight GPTModel's output layer multiplies on this stage (None without one).

    As ``GPTModel._postprocess`` picks it: the shared embedding/output weight when they are
    tied (the embedding on a stage that has it), else ``output_layer.weight``. ``model`` may be
    wrapped (DDP, Float16Module).
    """
    while not hasattr(model, "output_layer") and hasattr(model, "module"):
        model = model.module
    if not getattr(model, "post_process", False) or getattr(model, "output_layer", None) is None:
        return None
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight
