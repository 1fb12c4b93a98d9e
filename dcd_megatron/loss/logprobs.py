"""Log-probability of the target token from vocabulary-sharded logits, without gathering V.

One ``torch.autograd.Function``: each tensor-parallel rank computes, per row, the
log-sum-exp of its shard and the target logit if it owns the target; one all-gather of
those two numbers per row over ``group`` gives the global log-sum-exp (a max-stabilised
combination of the shard values) and the target logit. All arithmetic is fp32, done over
blocks of rows. ``logits`` is never written. What is kept for backward depends on dtype
(measured in docs/performance.md, "Loss benchmark"):

- fp32 logits: ``exp(x - local row max)`` is kept in a new fp32 buffer, which backward
  turns into the gradient in place. The gradient needs a logits-sized buffer anyway, so
  this costs no extra peak memory and saves recomputing the exponentials.
- bf16/fp16 logits: only the per-row log-sum-exp is kept; backward recomputes the softmax
  block by block in fp32 scratch and writes the low-precision gradient directly, so the
  extra memory is the gradient plus one bounded block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Elements per fp32 scratch block (rows x vocab shard). Small blocks stay in CPU caches
# (docs/performance.md, "Loss benchmark"); on GPUs larger blocks mean fewer kernel launches.
CPU_CHUNK_ELEMENTS = 1 << 18
GPU_CHUNK_ELEMENTS = 1 << 22


def _chunk_elements(device: torch.device) -> int:
    """The block size for `device` when the caller names none (`chunk_elements=None`)."""
    return CPU_CHUNK_ELEMENTS if device.type == "cpu" else GPU_CHUNK_ELEMENTS


def _group_rank_size(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _row_blocks(rows: int, width: int, chunk_elements: int):
    step = max(1, chunk_elements // max(width, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _fp32_blocks(out: torch.Tensor, chunk_elements: int):
    """Yield (rows, fp32 block) over row blocks of 2-D ``out``; write the block and it lands in ``out[rows]``.

    For fp32 ``out`` the block is a view of it; otherwise one reused fp32 scratch, copied into
    ``out[rows]`` when the loop moves on (so the math stays in fp32 whatever the logits' dtype).
    """
    scratch = None
    for rows in _row_blocks(out.shape[0], out.shape[1], chunk_elements):
        if out.dtype == torch.float32:
            yield rows, out[rows]
            continue
        if scratch is None:
            scratch = torch.empty((rows.stop - rows.start, out.shape[1]), dtype=torch.float32, device=out.device)
        block = scratch[: rows.stop - rows.start]
        yield rows, block
        out[rows].copy_(block)


def _shifted_exp_sums(x: torch.Tensor, chunk_elements: int, keep: torch.Tensor | None):
    """Per-row max and sum of exp(x - max) of ``x`` [rows, V] in fp32.

    With ``keep`` (an fp32 tensor shaped like ``x``) the exponentials are left in it;
    otherwise one reused scratch block holds them.
    """
    rows, width = x.shape
    row_max = torch.empty(rows, dtype=torch.float32, device=x.device)
    sums = torch.empty(rows, dtype=torch.float32, device=x.device)
    scratch = None
    for block in _row_blocks(rows, width, chunk_elements):
        n = block.stop - block.start
        if keep is not None:
            buf = keep[block]
        else:
            if scratch is None:
                scratch = torch.empty((n, width), dtype=torch.float32, device=x.device)
            buf = scratch[:n]
        row_max[block] = x[block].amax(dim=-1)
        torch.sub(x[block], row_max[block, None], out=buf)
        torch.sum(buf.exp_(), dim=-1, out=sums[block])
    return row_max, sums


def _local_ids(ids: torch.Tensor, rank: int, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids local to shard rank, 0 where another shard owns them; owned)`` for global ``ids``."""
    local = ids.to(torch.long) - rank * shard
    owned = (local >= 0) & (local < shard)
    return torch.where(owned, local, torch.zeros_like(local)), owned


def _combine_shards(lse: torch.Tensor, picked: torch.Tensor, group, world: int):
    """The global log-sum-exp ``[rows]`` and logits at ids ``[rows, m]`` from every shard's own
    (``picked`` is 0 on the shards that do not own an id): one all-gather of ``1 + m`` numbers a row."""
    if world == 1:
        return lse, picked
    stats = torch.cat([lse[:, None], picked], dim=1)  # [rows, 1 + m]
    parts = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(parts, stats, group=group)
    gathered = torch.stack(parts)  # [world, rows, 1 + m]
    return torch.logsumexp(gathered[:, :, 0], dim=0), gathered[:, :, 1:].sum(dim=0)


def _ids_grad_into(block: torch.Tensor, scale: torch.Tensor, g: torch.Tensor, local, owned) -> torch.Tensor:
    """Turn ``block`` (rows of ``softmax / scale``) into ``sum_j g_j (onehot(i_j) - softmax)`` in place.

    ``g`` is ``d loss / d log p(i_j)`` ``[rows, m]`` (fp32) for the ids ``local``/``owned`` of
    ``_local_ids``; an id listed twice in a row gets both of its terms.
    """
    block.mul_((scale * -g.sum(dim=1))[:, None])
    block.scatter_add_(1, local, torch.where(owned, g, torch.zeros_like(g)))
    return block


def _scatter_target(block: torch.Tensor, local: torch.Tensor, owned: torch.Tensor, g: torch.Tensor) -> None:
    """Add the one-hot part ``g * onehot(y)`` of the gradient on the rows whose target is here."""
    block.scatter_add_(1, local[:, None], torch.where(owned, g, torch.zeros_like(g))[:, None])


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, chunk_elements):
        rank, world = _group_rank_size(group)
        shard = logits.shape[-1]
        x = logits.reshape(-1, shard)
        local = targets.reshape(-1).to(torch.long) - rank * shard
        owned = (local >= 0) & (local < shard)
        local = torch.where(owned, local, torch.zeros_like(local))

        keep = None
        if ctx.needs_input_grad[0] and x.dtype == torch.float32:
            keep = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        row_max, sums = _shifted_exp_sums(x, chunk_elements, keep)
        lse = sums.log_().add_(row_max)
        picked = x.gather(1, local[:, None]).squeeze(1).float()
        target_logit = torch.where(owned, picked, torch.zeros_like(picked))

        if world > 1:
            # one collective: every shard's (log-sum-exp, target logit) per row
            stats = torch.stack([lse, target_logit])  # [2, rows]
            parts = [torch.empty_like(stats) for _ in range(world)]
            dist.all_gather(parts, stats, group=group)
            gathered = torch.stack(parts)  # [world, 2, rows]
            lse = torch.logsumexp(gathered[:, 0], dim=0)
            target_logit = gathered[:, 1].sum(dim=0)

        ctx.chunk_elements = chunk_elements
        ctx.kept = keep  # an intermediate that backward consumes, so not under version checks
        ctx.save_for_backward(logits, local, owned, lse, row_max)
        return (target_logit - lse).view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, local, owned, lse, row_max = ctx.saved_tensors
        shard = logits.shape[-1]
        x = logits.reshape(-1, shard)
        g = grad_out.reshape(-1).float()
        # d log p(y) / d x_v = g * (onehot(y)_v - softmax(x)_v)
        if ctx.kept is not None:
            kept, ctx.kept = ctx.kept, None  # it becomes the gradient; a second backward recomputes
            # softmax = exp(x - row_max) * exp(row_max - lse): one in-place pass per block
            scale = (row_max - lse).exp_().mul_(-g)
            for rows in _row_blocks(x.shape[0], shard, ctx.chunk_elements):
                block = kept[rows]
                block.mul_(scale[rows, None])
                _scatter_target(block, local[rows], owned[rows], g[rows])
            return kept.view(logits.shape), None, None, None

        # Recompute: -g * softmax = -sign(g) * exp(x - lse + log|g|), two passes per block,
        # an exact 0 where g == 0; only rows with g > 0 (a loss that lowers -log p) flip sign.
        shift = lse - g.abs().log()
        flip = g > 0
        any_flip = bool(flip.any())
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        for rows, block in _fp32_blocks(grad, ctx.chunk_elements):
            torch.sub(x[rows], shift[rows, None], out=block)
            block.exp_()
            if any_flip:
                block[flip[rows]] *= -1
            _scatter_target(block, local[rows], owned[rows], g[rows])
        return grad.view(logits.shape), None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    chunk_elements: int | None = None,
) -> torch.Tensor:
    """fp32 log p(target) of shape ``targets.shape`` from this rank's vocabulary shard.

    ``logits`` is ``[..., V/tp]`` in any float dtype; shard ``r`` of ``group`` holds global
    ids ``[r*V/tp, (r+1)*V/tp)``. ``targets`` is ``[...]`` of global ids in ``[0, V)`` (an
    id outside that range is not checked here and yields a meaningless value: the loss
    function checks and masks). ``group=None`` means the full vocabulary is local.
    Differentiable w.r.t. ``logits``; ``logits`` is not modified. ``chunk_elements`` sets
    the fp32 block size (default: by device, see ``CPU_CHUNK_ELEMENTS``).
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
    chunk = _chunk_elements(logits.device) if chunk_elements is None else int(chunk_elements)
    if chunk < 1:
        raise ValueError(f"vocab_parallel_logprobs: chunk_elements must be >= 1, got {chunk}")
    return _VocabParallelLogProbs.apply(logits, targets, group, chunk)
