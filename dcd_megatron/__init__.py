"""dcd-megatron: distribution-corrected offline reasoning distillation on Megatron-Core."""

__version__ = "0.1.0"
