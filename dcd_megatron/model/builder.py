"""Build a megatron-core GPTModel (Llama/Qwen style) for this rank's pipeline stage.

The local layer spec runs everywhere (CPU included); the Transformer Engine spec is used when TE
imports on a GPU, and is required for FP8 and context parallelism.
"""

from __future__ import annotations

import torch

from dcd_megatron.model.config import ModelConfig
from dcd_megatron.runtime.layout import Layout

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(model: ModelConfig, layout: Layout, *, sequence_parallel: bool, on_cpu: bool):
    """megatron-core TransformerConfig for the model, layout and device."""
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
        use_cpu_initialization=on_cpu,
        # Fused kernels need CUDA (apex/TE); the unfused paths are exact.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        batch_p2p_sync=not on_cpu,
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
