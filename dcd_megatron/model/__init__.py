"""Student/teacher model building: a Llama/Qwen-style megatron-core GPTModel from a typed config."""

from dcd_megatron.model.config import ModelConfig

__all__ = ["ModelConfig"]
