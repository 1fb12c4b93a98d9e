"""Hugging Face `config.json` (Llama, Qwen2/Qwen2.5) <-> our `ModelConfig`.

Only what megatron's GPTModel here can represent is accepted: RMSNorm, SwiGLU (silu), plain
RoPE (no scaling, full rotary), grouped-query attention, Qwen2's QKV bias, tied or untied
embeddings. Anything else is refused by name rather than converted into a different model.
Both the transformers 4 (`rope_theta`, `rope_scaling`) and 5 (`rope_parameters`) spellings are read.
"""

from __future__ import annotations

from typing import Any

from dcd_megatron.convert.errors import ConvertError
from dcd_megatron.model.config import ModelConfig

SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_HF_DTYPES = {v: k for k, v in _DTYPES.items()}


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, the scaling settings if any) from either transformers spelling."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        scaling = None if kind in (None, "default") else params
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            scaling = params
        return float(theta), scaling
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    return float(cfg.get("rope_theta", 10000.0)), scaling


def model_config_from_hf(cfg: dict[str, Any], *, dtype: str | None = None, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """Our ModelConfig for a HF Llama/Qwen2 config dict; refuses what it cannot represent."""
    kind = cfg.get("model_type")
    if kind not in SUPPORTED:
        raise ConvertError(
            f"config.json has model_type={kind!r}; dcd-convert supports {sorted(SUPPORTED)} "
            "(Llama and Qwen2/Qwen2.5 architectures)"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"config.json has hidden_act={act!r}; only SwiGLU with silu is supported")
    theta, scaling = _rope(cfg)
    if scaling is not None:
        raise ConvertError(
            f"config.json sets RoPE scaling {scaling}; only plain RoPE (rope_type=default, full "
            "rotary dimension) is supported, e.g. Llama 3 (not 3.1+) or Qwen2.5"
        )
    if cfg.get("attention_bias"):
        raise ConvertError("config.json has attention_bias=true (biases on q/k/v AND o_proj); only Qwen2's q/k/v bias is supported")
    if cfg.get("mlp_bias"):
        raise ConvertError("config.json has mlp_bias=true; MLP biases are not supported")
    layer_types = cfg.get("layer_types") or []
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        raise ConvertError("config.json uses sliding-window attention; only full attention is supported")
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        raise ConvertError("config.json describes a mixture-of-experts model; only dense models are supported")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size") if k not in cfg]
    if missing:
        raise ConvertError(f"config.json lacks {missing}; is it a Llama/Qwen2 causal LM config?")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or hidden // heads
    source_dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if dtype is None:
        if source_dtype not in _DTYPES:
            raise ConvertError(f"config.json has dtype {source_dtype!r}; pass --dtype fp32|bf16|fp16")
        dtype = _DTYPES[source_dtype]
    tied = cfg.get("tie_word_embeddings")
    if tied is None:
        tied = False  # both LlamaConfig and Qwen2Config default to untied
    return ModelConfig(
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        kv_channels=None if head_dim * heads == hidden else int(head_dim),
        vocab_size=int(cfg["vocab_size"]),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rotary_base=theta,
        norm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        add_qkv_bias=kind == "qwen2",
        untie_embeddings_and_output_weights=not tied,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        attention_dropout=float(cfg.get("attention_dropout", 0.0)),
        params_dtype=dtype,
    )


def hf_config_from_model(
    model: ModelConfig,
    *,
    dtype: str,
    template: dict[str, Any] | None = None,
    special_ids: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """A HF config.json dict for the model; `template` (e.g. the original config) fills the rest.

    Architecture fields always come from `model`, so a template can never contradict the weights.
    """
    if model.rotary_percent != 1.0:
        raise ConvertError(f"model.rotary_percent={model.rotary_percent}: Llama/Qwen2 in transformers need full rotary")
    template = dict(template or {})
    kind = template.get("model_type")
    if kind not in SUPPORTED:
        kind = "qwen2" if model.add_qkv_bias else "llama"
    if model.add_qkv_bias and kind != "qwen2":
        raise ConvertError("the model has QKV biases, which only the qwen2 architecture expresses")
    if kind == "qwen2" and not model.add_qkv_bias:
        raise ConvertError("a qwen2 config needs QKV biases but the model has none (model.add_qkv_bias=false)")
    out = {k: v for k, v in template.items() if k not in ("transformers_version", "_name_or_path")}
    out.update(
        architectures=[SUPPORTED[kind]],
        model_type=kind,
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups,
        head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon,
        rope_theta=model.rotary_base,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        initializer_range=model.init_method_std,
        attention_dropout=model.attention_dropout,
        dtype=_HF_DTYPES[dtype],
    )
    out.pop("torch_dtype", None)
    out.pop("rope_scaling", None)
    if isinstance(out.get("rope_parameters"), dict) and "full_attention" not in out["rope_parameters"]:
        out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": model.rotary_base, "rope_type": "default"}
    if kind == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, max_window_layers=model.num_layers)
        out.pop("layer_types", None)
    for key, value in (special_ids or {}).items():
        if value is not None:
            out.setdefault(key, value)
    return out
