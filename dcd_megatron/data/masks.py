"""Attention for packed samples: a block-diagonal causal mask (CPU/local spec) or THD params (TE).

Positions: RoPE depends only on the distance between query and key, and the block-diagonal
mask never lets a token see another document, so global positions and per-document
``position_ids`` give the same attention (learned absolute positions would differ).
"""

from __future__ import annotations

import torch


def packed_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``bool [b, 1, s, s]``, True = masked out (megatron's convention), for ``segment_ids [b, s]``.

    Query ``i`` sees key ``j`` iff ``j <= i`` and both are in the same document. Padding
    (segment -1) sees only itself, so no row is fully masked (a fully masked softmax row is NaN).
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [batch, seq], got shape {tuple(segment_ids.shape)}")  # internal
    s = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    real = (segment_ids >= 0)[:, :, None]
    eye = torch.eye(s, dtype=torch.bool, device=segment_ids.device)
    allowed = (same & causal & real) | eye
    return (~allowed).unsqueeze(1)


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 cumulative run lengths ``[0, len_0, len_0+len_1, ..., s]`` of one sample's segments.

    Trailing padding counts as one more sequence so that ``cu_seqlens[-1]`` equals ``s``.
    """
    if segment_ids.dim() == 2:
        if segment_ids.shape[0] != 1:
            raise ValueError(  # internal
                f"packed (THD) attention takes micro_batch_size=1, got {segment_ids.shape[0]} rows; "
                "set the micro-batch size to 1 when packing with Transformer Engine"
            )
        segment_ids = segment_ids[0]
    seg = segment_ids.to(torch.int64)
    change = torch.ones_like(seg, dtype=torch.bool)
    change[1:] = seg[1:] != seg[:-1]
    starts = torch.nonzero(change).flatten()
    run_ids = seg[starts]
    real = run_ids[run_ids >= 0]
    if len(torch.unique(real)) != len(real) or (real[1:] < real[:-1]).any():
        raise ValueError("segment_ids must be contiguous, increasing runs (as produced by packing)")  # internal
    if (run_ids[:-1] < 0).any():
        raise ValueError("padding (segment -1) must only appear at the end of a packed sample")  # internal
    total = torch.tensor([seg.numel()], device=seg.device)
    return torch.cat([starts, total]).to(torch.int32)


def packed_seq_params_from_segments(segment_ids: torch.Tensor):
    """megatron ``PackedSeqParams`` (``qkv_format="thd"``) for a micro-batch of one packed sample."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens_from_segments(segment_ids)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )
