"""Hugging Face <-> Megatron-Core checkpoint conversion for Llama and Qwen2 (`dcd-convert`).

Written here because Megatron-Bridge does not import without Transformer Engine (see
docs/checkpoints.md). Import cost is small: megatron-core is imported only inside the
conversion functions.
"""

from dcd_megatron.convert.errors import ConvertError
from dcd_megatron.convert.hf_config import hf_config_from_model, model_config_from_hf
from dcd_megatron.convert.hf_to_mcore import ImportResult, convert_hf_to_mcore
from dcd_megatron.convert.mcore_to_hf import ExportResult, convert_mcore_to_hf
from dcd_megatron.convert.tensors import Arch, fuse_gate_up, fuse_qkv, split_gate_up, split_qkv

__all__ = [
    "Arch", "ConvertError", "ExportResult", "ImportResult", "convert_hf_to_mcore", "convert_mcore_to_hf",
    "fuse_gate_up", "fuse_qkv", "hf_config_from_model", "model_config_from_hf", "split_gate_up", "split_qkv",
]
