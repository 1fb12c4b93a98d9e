"""Context-parallel sequence layouts: rebuild full ``[b, S]`` per-token rows and slice them back.

Megatron's context parallelism splits every sequence into ``2*cp`` chunks and gives CP rank
``r`` chunks ``r`` and ``2*cp-1-r`` concatenated ("load_balanced"); "contiguous" gives rank
``r`` the ``r``-th of ``cp`` equal pieces. The weights that look along the sequence
(prefix scans, per-document sums, medians) all-gather a few per-token numbers, which are
tiny next to the logits, and evaluate the single-process function on the full rows; every
CP rank then keeps its own positions, so the result is exact by construction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS: tuple[str, ...] = ("load_balanced", "contiguous")


def cp_size(cp_group) -> int:
    """World size of ``cp_group`` (1 for None)."""
    if cp_group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(cp_group)


def resolve_layout(cp_group, cp_layout: str | None) -> str | None:
    """The layout in use: None without CP, else ``cp_layout`` (default "load_balanced")."""
    if cp_size(cp_group) == 1:
        return None
    layout = cp_layout or "load_balanced"
    if layout not in LAYOUTS:
        raise ValueError(f"cp_layout {layout!r} is not one of {list(LAYOUTS)}")
    return layout


def _check_local_length(s_local: int, size: int, layout: str) -> None:
    if layout == "load_balanced" and s_local % 2:
        raise ValueError(
            f"cp_layout 'load_balanced' needs an even local sequence length (2 chunks per CP rank), "
            f"got {s_local}; pad sequences to a multiple of 2*cp={2 * size} or use cp_layout='contiguous'"
        )


def gather_full(local: list[torch.Tensor], cp_group, cp_layout: str | None) -> list[torch.Tensor]:
    """All-gather ``[b, s_local]`` tensors over CP into full ``[b, S]`` rows (one collective).

    Values travel as float64, so integer ids up to 2**53 survive; results keep their dtype.
    """
    layout = resolve_layout(cp_group, cp_layout)
    if layout is None:
        return list(local)
    size = cp_size(cp_group)
    b, s_local = local[0].shape
    _check_local_length(s_local, size, layout)
    packed = torch.stack([t.to(torch.float64) for t in local])  # [k, b, s_local]
    parts = [torch.empty_like(packed) for _ in range(size)]
    dist.all_gather(parts, packed.contiguous(), group=cp_group)
    full = merge_parts(parts, size, layout)
    return [full[i].to(t.dtype) for i, t in enumerate(local)]


def local_part(full: torch.Tensor, cp_group, cp_layout: str | None) -> torch.Tensor:
    """This CP rank's positions of a full ``[b, S]`` tensor (the inverse of gather_full)."""
    layout = resolve_layout(cp_group, cp_layout)
    if layout is None:
        return full
    return split_for_rank(full, dist.get_rank(cp_group), cp_size(cp_group), layout)


def chunk_ids(rank: int, size: int, cp_layout: str = "load_balanced") -> tuple[int, ...]:
    """The chunks of the sequence rank ``rank`` holds, in order: ``(r, 2*cp-1-r)`` of ``2*cp``
    ("load_balanced") or ``(r,)`` of ``cp`` ("contiguous")."""
    return (rank, 2 * size - 1 - rank) if cp_layout == "load_balanced" else (rank,)


def split_for_rank(
    full: torch.Tensor, rank: int, size: int, cp_layout: str = "load_balanced", dim: int = -1
) -> torch.Tensor:
    """Rank ``rank``'s positions of full data along ``dim`` (the last by default): how a data loader shards for CP."""
    length = full.shape[dim]
    pieces = 2 * size if cp_layout == "load_balanced" else size
    if length % pieces:
        raise ValueError(f"sequence length {length} is not divisible into {pieces} chunks for cp_layout {cp_layout!r}")
    chunk = length // pieces
    return torch.cat([full.narrow(dim, i * chunk, chunk) for i in chunk_ids(rank, size, cp_layout)], dim=dim)


def merge_parts(parts: list[torch.Tensor], size: int, cp_layout: str = "load_balanced", dim: int = -1) -> torch.Tensor:
    """The full data from every rank's part (``parts[r]`` is rank ``r``'s): the inverse of ``split_for_rank``."""
    chunks: list[torch.Tensor | None] = [None] * (2 * size if cp_layout == "load_balanced" else size)
    for r, part in enumerate(parts):
        ids = chunk_ids(r, size, cp_layout)
        for i, piece in zip(ids, part.chunk(len(ids), dim=dim)):
            chunks[i] = piece
    return torch.cat(chunks, dim=dim)
