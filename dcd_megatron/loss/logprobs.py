"""Log-probability of the target token from vocabulary-sharded logits, without gathering V.

One ``torch.autograd.Function``: each tensor-parallel rank computes, per row, the
log-sum-exp of its shard and the target logit if it owns the target; one all-gather of
those two numbers per row over ``group`` gives the global log-sum-exp (a max-stabilised
combination of the shard values) and the target logit. Work is done in fp32 over blocks of
rows, so fp32 temporaries stay bounded; only the per-row log-sum-exp is saved, and the
softmax is recomputed in backward. ``logits`` is never written.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Upper bound on the elements of each fp32 temporary (rows x vocab shard); 4M = 16 MiB.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _group_rank_size(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _row_blocks(rows: int, shard: int, chunk_elements: int):
    step = max(1, chunk_elements // max(shard, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, chunk_elements):
        rank, world = _group_rank_size(group)
        shard = logits.shape[-1]
        x = logits.reshape(-1, shard)
        local = targets.reshape(-1).to(torch.long) - rank * shard
        owned = (local >= 0) & (local < shard)
        local = torch.where(owned, local, torch.zeros_like(local))

        lse = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for rows in _row_blocks(x.shape[0], shard, chunk_elements):
            torch.logsumexp(x[rows].float(), dim=-1, out=lse[rows])
        picked = x.gather(1, local[:, None]).squeeze(1).float()
        target_logit = torch.where(owned, picked, torch.zeros_like(picked))

        if world > 1:
            stats = torch.stack([lse, target_logit])  # [2, rows]
            parts = [torch.empty_like(stats) for _ in range(world)]
            dist.all_gather(parts, stats, group=group)
            gathered = torch.stack(parts)  # [world, 2, rows]
            lse = torch.logsumexp(gathered[:, 0], dim=0)
            target_logit = gathered[:, 1].sum(dim=0)

        ctx.save_for_backward(logits, local, owned, lse)
        ctx.chunk_elements = chunk_elements
        return (target_logit - lse).view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, local, owned, lse = ctx.saved_tensors
        shard = logits.shape[-1]
        x = logits.reshape(-1, shard)
        g = grad_out.reshape(-1).float()
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        buffer = None  # fp32 scratch rows when the logits are not fp32
        for rows in _row_blocks(x.shape[0], shard, ctx.chunk_elements):
            n = rows.stop - rows.start
            if grad.dtype == torch.float32:
                block = grad[rows]
            else:
                if buffer is None:
                    buffer = torch.empty((n, shard), dtype=torch.float32, device=x.device)
                block = buffer[:n]
            # d log p(y) / d x_v = onehot(y)_v - softmax(x)_v, times the incoming gradient
            torch.sub(x[rows], lse[rows, None], out=block)
            block.exp_().mul_(-g[rows, None])
            block.scatter_add_(1, local[rows, None], torch.where(owned[rows], g[rows], 0.0)[:, None])
            if grad.dtype != torch.float32:
                grad[rows].copy_(block)
        return grad.view(logits.shape), None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """fp32 log p(target) of shape ``targets.shape`` from this rank's vocabulary shard.

    ``logits`` is ``[..., V/tp]`` in any float dtype; shard ``r`` of ``group`` holds global
    ids ``[r*V/tp, (r+1)*V/tp)``. ``targets`` is ``[...]`` of global ids in ``[0, V)`` (an
    id outside that range is not checked here and yields a meaningless value: the loss
    function checks and masks). ``group=None`` means the full vocabulary is local.
    Differentiable w.r.t. ``logits``; ``logits`` is not modified.
    """
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"vocab_parallel_logprobs: logits {tuple(logits.shape)} must be targets {tuple(targets.shape)} "
            "plus a trailing vocabulary-shard dimension"
        )
    if not logits.is_floating_point():
        raise TypeError(f"vocab_parallel_logprobs: logits must be floating point, got {logits.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"vocab_parallel_logprobs: targets must be integer token ids, got {targets.dtype}")
    if chunk_elements < 1:
        raise ValueError(f"vocab_parallel_logprobs: chunk_elements must be >= 1, got {chunk_elements}")
    return _VocabParallelLogProbs.apply(logits, targets, group, int(chunk_elements))
