"""Pure tensor mappings between Hugging Face Llama/Qwen2 weights and megatron-core's GPTModel.

Megatron fuses Q, K and V into `linear_qkv`, interleaved per query group as
[q_1 .. q_{h/g}, k, v] (see megatron-core `SelfAttention.get_query_key_value_tensors`), and the
SwiGLU gate and up projections into `linear_fc1` = [gate; up]. Its vocabulary rows are padded
to `padded_vocab_size` (zero rows here; stripped again on export). Names are the parameter
names of a TP=1, PP=1 GPTModel: the local layer spec by default, or Transformer Engine's
(`fused_norms=True`, which folds each pre-norm into the following linear layer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from dcd_megatron.convert.errors import ConvertError


@dataclass(frozen=True)
class Arch:
    """The shapes a weight mapping needs (derived from a `ModelConfig`)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    qkv_bias: bool
    tied: bool

    @classmethod
    def from_model_config(cls, model) -> "Arch":
        return cls(
            num_layers=model.num_layers,
            hidden_size=model.hidden_size,
            num_heads=model.num_attention_heads,
            num_groups=model.query_groups,
            head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
            ffn_size=model.ffn_size,
            vocab_size=model.vocab_size,
            qkv_bias=model.add_qkv_bias,
            tied=not model.untie_embeddings_and_output_weights,
        )


# ---- the fused layouts ---------------------------------------------------------------------
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, *, num_heads: int, num_groups: int, head_dim: int) -> Tensor:
    """HF q/k/v projections (weights `[out, in]` or biases `[out]`) -> megatron's `linear_qkv`."""
    per_group = num_heads // num_groups
    rest = q.shape[1:]
    q = q.reshape(num_groups, per_group * head_dim, *rest)
    k = k.reshape(num_groups, head_dim, *rest)
    v = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, *, num_heads: int, num_groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron's `linear_qkv` -> HF (q, k, v); the inverse of `fuse_qkv`."""
    per_group = num_heads // num_groups
    rest = qkv.shape[1:]
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(num_heads * head_dim, *rest).contiguous(),
        k.reshape(num_groups * head_dim, *rest).contiguous(),
        v.reshape(num_groups * head_dim, *rest).contiguous(),
    )


def fuse_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """HF gate and up projections -> megatron's `linear_fc1` = [gate; up]."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: Tensor) -> tuple[Tensor, Tensor]:
    """Megatron's `linear_fc1` -> (gate, up)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: Tensor, padded_rows: int) -> Tensor:
    """Append zero rows up to megatron's padded vocabulary size."""
    if weight.shape[0] > padded_rows:
        raise ConvertError(f"vocabulary of {weight.shape[0]} rows does not fit {padded_rows} padded rows")
    pad = weight.new_zeros((padded_rows - weight.shape[0], *weight.shape[1:]))
    return torch.cat([weight, pad], dim=0)


def strip_vocab(weight: Tensor, vocab_size: int) -> Tensor:
    """Drop megatron's vocabulary padding rows."""
    return weight[:vocab_size].contiguous()


# ---- names ---------------------------------------------------------------------------------
def _norm_names(fused_norms: bool) -> tuple[str, str]:
    if fused_norms:
        return "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"
    return "input_layernorm.weight", "pre_mlp_layernorm.weight"


def hf_to_mcore(arch: Arch, get: Callable[[str], Tensor], *, padded_vocab: int, fused_norms: bool = False) -> Iterator[tuple[str, Tensor]]:
    """Megatron (name, tensor) pairs from HF tensors read lazily by name through `get`."""
    heads = dict(num_heads=arch.num_heads, num_groups=arch.num_groups, head_dim=arch.head_dim)
    in_norm, mlp_norm = _norm_names(fused_norms)
    yield "embedding.word_embeddings.weight", pad_vocab(get("model.embed_tokens.weight"), padded_vocab)
    for i in range(arch.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        yield mc + in_norm, get(hf + "input_layernorm.weight")
        yield mc + "self_attention.linear_qkv.weight", fuse_qkv(
            get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"), **heads
        )
        if arch.qkv_bias:
            yield mc + "self_attention.linear_qkv.bias", fuse_qkv(
                get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"), **heads
            )
        yield mc + "self_attention.linear_proj.weight", get(attn + "o_proj.weight")
        yield mc + mlp_norm, get(hf + "post_attention_layernorm.weight")
        yield mc + "mlp.linear_fc1.weight", fuse_gate_up(get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight"))
        yield mc + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not arch.tied:
        yield "output_layer.weight", pad_vocab(get("lm_head.weight"), padded_vocab)


def mcore_to_hf(arch: Arch, state: Mapping[str, Tensor], *, fused_norms: bool = False) -> Iterator[tuple[str, Tensor]]:
    """HF (name, tensor) pairs from a TP=1/PP=1 megatron state dict (padding stripped)."""
    heads = dict(num_heads=arch.num_heads, num_groups=arch.num_groups, head_dim=arch.head_dim)
    in_norm, mlp_norm = _norm_names(fused_norms)

    def take(name: str) -> Tensor:
        if name not in state:
            raise ConvertError(f"the megatron checkpoint has no {name!r}; is it a Llama/Qwen2-style GPTModel?")
        return state[name]

    yield "model.embed_tokens.weight", strip_vocab(take("embedding.word_embeddings.weight"), arch.vocab_size)
    for i in range(arch.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = hf + "self_attn."
        yield hf + "input_layernorm.weight", take(mc + in_norm)
        q, k, v = split_qkv(take(mc + "self_attention.linear_qkv.weight"), **heads)
        yield from ((attn + "q_proj.weight", q), (attn + "k_proj.weight", k), (attn + "v_proj.weight", v))
        if arch.qkv_bias:
            q, k, v = split_qkv(take(mc + "self_attention.linear_qkv.bias"), **heads)
            yield from ((attn + "q_proj.bias", q), (attn + "k_proj.bias", k), (attn + "v_proj.bias", v))
        yield attn + "o_proj.weight", take(mc + "self_attention.linear_proj.weight")
        yield hf + "post_attention_layernorm.weight", take(mc + mlp_norm)
        gate, up = split_gate_up(take(mc + "mlp.linear_fc1.weight"))
        yield hf + "mlp.gate_proj.weight", gate
        yield hf + "mlp.up_proj.weight", up
        yield hf + "mlp.down_proj.weight", take(mc + "mlp.linear_fc2.weight")
    yield "model.norm.weight", take("decoder.final_layernorm.weight")
    if not arch.tied:
        yield "lm_head.weight", strip_vocab(take("output_layer.weight"), arch.vocab_size)
