"""The model architecture as a typed config (Llama/Qwen style: RMSNorm, SwiGLU, RoPE, GQA)."""

from dataclasses import dataclass
from typing import Literal

from dcd_megatron.errors import ConfigError

FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


@dataclass
class ModelConfig:
    """Architecture of the student (or teacher). `vocab_size=None` takes the tokenizer's size."""

    num_layers: int = 2  # transformer layers
    hidden_size: int = 64  # model width
    num_attention_heads: int = 4  # query heads
    num_query_groups: int | None = 2  # None = multi-head attention (one group per head)
    ffn_hidden_size: int | None = None  # None = Llama's rounding of 8/3 * hidden
    kv_channels: int | None = None  # None = hidden_size / num_attention_heads
    vocab_size: int | None = None  # None = the tokenizer's vocabulary size
    make_vocab_size_divisible_by: int = 128  # the embedding is padded to a multiple of this x tp
    max_position_embeddings: int = 4096  # longest sequence the model is built for (>= data.seq_length)
    rotary_base: float = 10000.0  # RoPE theta (Qwen2.5: 1e6, Llama 3: 5e5)
    rotary_percent: float = 1.0  # fraction of each head's channels rotated
    norm_epsilon: float = 1e-5  # RMSNorm epsilon
    add_qkv_bias: bool = False  # Qwen2 has QKV bias
    untie_embeddings_and_output_weights: bool = True  # false = the LM head shares the embedding
    init_method_std: float = 0.02  # std of the normal weight initialisation
    attention_dropout: float = 0.0  # dropout on attention probabilities
    hidden_dropout: float = 0.0  # dropout on residual branches
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # parameter/activation dtype (the loss is always fp32)
    fp8: Literal["hybrid", "e4m3"] | None = None  # FP8 transformer layers through Transformer Engine (GPU); null = off
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"  # delayed/tensorwise: sm89+, blockwise: Hopper, mxfp8: Blackwell
    init_checkpoint: str | None = None  # checkpoint to start from (dcd-convert output, run or iter dir); same architecture

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks run at construction; call again after changing fields in place."""
        for name in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads}), or set model.kv_channels"
            )
        groups = self.query_groups
        if groups < 1 or self.num_attention_heads % groups:
            raise ConfigError(
                f"model.num_query_groups ({self.num_query_groups}) must divide "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ConfigError(f"model.vocab_size must be >= 2, got {self.vocab_size}")
        if self.make_vocab_size_divisible_by < 1:
            raise ConfigError("model.make_vocab_size_divisible_by must be >= 1")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"model.rotary_percent must be in (0, 1], got {self.rotary_percent}")
        head = self.kv_channels or self.hidden_size // self.num_attention_heads
        rotated = int(head * self.rotary_percent)
        if rotated < 2 or rotated % 2:
            raise ConfigError(
                f"RoPE rotates channel pairs: model.kv_channels x model.rotary_percent = {head} x "
                f"{self.rotary_percent} = {rotated} channels must be even and >= 2"
            )
        for name in ("attention_dropout", "hidden_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ConfigError(f"model.fp8 must be one of {FP8_FORMATS} or null, got {self.fp8!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"model.fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        if self.fp8 is not None and self.params_dtype == "fp32":
            raise ConfigError(
                "model.fp8 needs model.params_dtype=bf16 (FP8 wraps the BF16 transformer layers)"
            )

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        size = int(8 * self.hidden_size / 3)
        return 16 * ((size + 15) // 16)

    def num_parameters(self, padded_vocab: int) -> int:
        """Parameters of the GPT model this builds (embedding, layers, final norm, an untied LM head): for disk estimates."""
        h = self.hidden_size
        kv = self.kv_channels or h // self.num_attention_heads
        q, g = self.num_attention_heads * kv, self.query_groups * kv
        attention = h * (q + 2 * g) + q * h + ((q + 2 * g) if self.add_qkv_bias else 0)
        layer = attention + 3 * h * self.ffn_size + 2 * h  # SwiGLU's three matrices, two RMSNorms
        head = padded_vocab * h if self.untie_embeddings_and_output_weights else 0
        return self.num_layers * layer + padded_vocab * h + head + h

    def shape_differences(self, other: "ModelConfig") -> list[str]:
        """The fields that fix parameter shapes and differ from `other` (a checkpoint's), as `name: ours vs theirs`."""
        names = ("num_layers", "hidden_size", "num_attention_heads", "query_groups", "ffn_size", "kv_channels",
                 "add_qkv_bias", "untie_embeddings_and_output_weights")
        return [f"{n}: {getattr(self, n)} vs {getattr(other, n)}" for n in names if getattr(self, n) != getattr(other, n)]

    def padded_vocab_size(self, vocab_size: int, tp: int) -> int:
        """Pad the vocabulary so every tensor-parallel shard has the same width (megatron's rule)."""
        multiple = self.make_vocab_size_divisible_by * tp
        return ((vocab_size + multiple - 1) // multiple) * multiple
