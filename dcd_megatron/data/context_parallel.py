"""Megatron's load-balanced context-parallel layout for ``[b, s]`` batches, and its inverse.

The sequence is cut into ``2 * cp_size`` equal chunks; CP rank ``r`` keeps chunks ``r`` and
``2 * cp_size - 1 - r`` (so every rank gets the same share of causal-attention work), the same
layout as megatron's ``get_batch_on_this_cp_rank``. The layout itself is
``dcd_megatron.loss.cp_layout``'s (the loss gathers and slices per-token rows with it).
"""

from __future__ import annotations

import torch

from dcd_megatron.loss.cp_layout import merge_parts, split_for_rank

# Tensors whose sequence dimension is not 1: the [b, 1, s, s] attention mask splits its rows.
SEQ_DIMS = {"attention_mask": 2}


def _check(cp_rank: int, cp_size: int) -> None:
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank}, cp_size={cp_size}: need 0 <= cp_rank < cp_size")  # internal


def split_tensor_for_context_parallel(x: torch.Tensor, cp_rank: int, cp_size: int, seq_dim: int = 1) -> torch.Tensor:
    """This CP rank's two chunks of ``x`` along ``seq_dim``, concatenated."""
    _check(cp_rank, cp_size)
    if cp_size == 1:
        return x
    s = x.shape[seq_dim]
    if s % (2 * cp_size):
        raise ValueError(  # internal
            f"sequence length {s} is not divisible by 2 x cp_size = {2 * cp_size}; "
            "choose data.seq_length as a multiple of 2 x context parallel size"
        )
    return split_for_rank(x, cp_rank, cp_size, "load_balanced", dim=seq_dim)


def split_for_context_parallel(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """Every tensor of ``batch`` with a sequence dimension, sliced into this CP rank's layout."""
    _check(cp_rank, cp_size)
    if cp_size == 1:
        return dict(batch)
    out = {}
    for key, value in batch.items():
        dim = SEQ_DIMS.get(key, 1)
        if isinstance(value, torch.Tensor) and value.dim() > dim:
            out[key] = split_tensor_for_context_parallel(value, cp_rank, cp_size, dim)
        else:
            out[key] = value
    return out


def merge_context_parallel(parts: list[dict], cp_size: int | None = None) -> dict:
    """Inverse of `split_for_context_parallel`: ``parts[r]`` is CP rank ``r``'s batch."""
    cp_size = cp_size or len(parts)
    if len(parts) != cp_size:
        raise ValueError(f"need one part per CP rank: got {len(parts)} for cp_size={cp_size}")  # internal
    if cp_size == 1:
        return dict(parts[0])
    out = {}
    for key, value in parts[0].items():
        dim = SEQ_DIMS.get(key, 1)
        if not (isinstance(value, torch.Tensor) and value.dim() > dim):
            out[key] = value
            continue
        out[key] = merge_parts([part[key] for part in parts], cp_size, "load_balanced", dim=dim)
    return out
