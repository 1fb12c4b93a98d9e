"""The KL form of the per-token term: KL(teacher || student) over the teacher's top-k tokens plus
one residual bucket ("everything else"), exact under tensor parallelism.

With teacher top-k ids ``i_1..i_k`` and log-probs ``a_j`` at a position, ``p_j = exp(a_j)``
and the teacher's residual mass ``r = 1 - sum_j p_j``; with the student's log-probs ``s_j``
of the same ids and residual ``r_s = 1 - sum_j exp(s_j)``::

    KL_t = sum_j p_j (a_j - s_j) + r (log r - log r_s)        (0 log 0 = 0)

Only the student side carries gradient. ``s_j`` comes from one vocab-parallel function that
gathers k logits per row from the shard that owns each id and shares the log-sum-exp over the
tensor-parallel group, so the full vocabulary is never gathered. The DCD weights multiply this
term exactly as they multiply ``-s_t`` in the default form.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dcd_megatron.loss.logprobs import (
    _chunk_elements,
    _combine_shards,
    _fp32_blocks,
    _group_rank_size,
    _ids_grad_into,
    _local_ids,
    _shifted_exp_sums,
)

_RESIDUAL_FLOOR = 1e-12  # log of a vanishing residual mass stays finite (its weight r is ~0 then)


class _VocabParallelGatherLogProbs(torch.autograd.Function):
    """log softmax(x)[ids] for ``ids`` [rows, k] from this rank's vocabulary shard of ``x``."""

    @staticmethod
    def forward(ctx, logits, ids, group, chunk_elements):
        rank, world = _group_rank_size(group)
        shard = logits.shape[-1]
        x = logits.reshape(-1, shard)
        local, owned = _local_ids(ids.reshape(-1, ids.shape[-1]), rank, shard)
        row_max, sums = _shifted_exp_sums(x, chunk_elements, None)
        lse = sums.log_().add_(row_max)
        picked = torch.where(owned, x.gather(1, local).float(), torch.zeros(local.shape, device=x.device))
        lse, picked = _combine_shards(lse, picked, group, world)
        ctx.chunk_elements = chunk_elements
        ctx.save_for_backward(logits, local, owned, lse)
        return (picked - lse[:, None]).view(ids.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, local, owned, lse = ctx.saved_tensors
        shard = logits.shape[-1]
        x = logits.reshape(-1, shard)
        g = grad_out.reshape(local.shape).float()
        # d/dx_v sum_j g_j s_j = sum_j g_j onehot(i_j)_v - (sum_j g_j) softmax_v
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ones = torch.ones_like(lse)
        for rows, block in _fp32_blocks(grad, ctx.chunk_elements):
            torch.sub(x[rows], lse[rows, None], out=block)
            _ids_grad_into(block.exp_(), ones[rows], g[rows], local[rows], owned[rows])
        return grad.view(logits.shape), None, None, None


def vocab_parallel_gather_logprobs(logits: torch.Tensor, ids: torch.Tensor, group=None, *, chunk_elements=None):
    """fp32 student log-probs ``[..., k]`` of the global token ids ``ids`` from vocab-sharded ``logits``.

    ``logits`` is ``[..., V/tp]`` (shard ``r`` of ``group`` holds ids ``[r*V/tp, (r+1)*V/tp)``),
    ``ids`` is ``[..., k]`` with the same leading shape. Differentiable w.r.t. ``logits``,
    which is not modified. Ids must be in ``[0, V)``.
    """
    if logits.shape[:-1] != ids.shape[:-1]:
        raise ValueError(
            f"vocab_parallel_gather_logprobs: logits {tuple(logits.shape)} and ids {tuple(ids.shape)} "
            "must share their leading dimensions"
        )
    if ids.is_floating_point():
        raise TypeError(f"vocab_parallel_gather_logprobs: ids must be integer token ids, got {ids.dtype}")
    chunk = _chunk_elements(logits.device) if chunk_elements is None else int(chunk_elements)
    return _VocabParallelGatherLogProbs.apply(logits, ids, group, chunk)


def topk_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over k tokens plus the residual bucket, per position (last dim = k)."""
    teacher = teacher_logprobs.float()
    p = teacher.exp()
    r_teacher = (1.0 - p.sum(dim=-1)).clamp_min(0.0)
    r_student = (1.0 - student_logprobs.exp().sum(dim=-1)).clamp_min(_RESIDUAL_FLOOR)
    head = (p * (teacher - student_logprobs)).sum(dim=-1)
    tail = torch.where(
        r_teacher > 0,
        r_teacher * (r_teacher.clamp_min(_RESIDUAL_FLOOR).log() - r_student.log()),
        torch.zeros_like(r_teacher),
    )
    return head + tail


class TopKKLTerm:
    """A ``GatheredTerm`` (``contract.py``) using the batch's ``teacher_topk_ids`` / ``teacher_topk_logprobs`` ``[b, s, k]``.

    On the logits it gathers the student log-probs of the ids itself; the chunked loss
    (``chunked.py``) gathers them from hidden states and calls ``gathered``'s function.
    """

    def __init__(self, tp_group=None):
        self.tp_group = tp_group

    @staticmethod
    def checked_inputs(batch: Mapping[str, torch.Tensor], shape) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, teacher log-probs)`` ``[b, s, k]`` for the tokens ``[b, s] = shape``; positions
        without a teacher top-k (only allowed where the loss mask is 0) get id 0 and log-prob -30."""
        ids, teacher = batch.get("teacher_topk_ids"), batch.get("teacher_topk_logprobs")
        if ids is None or teacher is None:
            raise ValueError(
                "loss.term=topk_kl needs teacher top-k in the batch: score the traces with "
                "`dcd-score --top-k K` and set data.topk=K"
            )
        shape = tuple(shape)
        if tuple(ids.shape[:2]) != shape or ids.shape != teacher.shape or ids.dim() != 3:
            raise ValueError(
                f"teacher_topk_ids {tuple(ids.shape)} and teacher_topk_logprobs {tuple(teacher.shape)} "
                f"must both be [b, s, k] with [b, s] = {shape}"
            )
        valid = batch["loss_mask"] > 0
        known = (ids >= 0).all(dim=-1) & torch.isfinite(teacher).all(dim=-1)
        missing = int((valid & ~known).sum())
        if missing:
            raise ValueError(
                f"loss.term=topk_kl: {missing} trained token(s) have no teacher top-k (e.g. an appended "
                "eos the teacher did not score); rescore with `dcd-score --top-k` including the eos"
            )
        safe_ids = torch.where(known[..., None], ids, torch.zeros_like(ids))
        safe_teacher = torch.where(known[..., None], teacher, torch.full_like(teacher, -30.0))
        return safe_ids, safe_teacher

    def gathered(self, batch: Mapping[str, torch.Tensor], shape):
        """``(teacher top-k ids [b, s, k], KL from the log-probs [n, 1 + k] of (label, ids) of the rows)``."""
        ids, teacher = self.checked_inputs(batch, shape)
        flat_teacher = teacher.reshape(-1, teacher.shape[-1])
        return ids, lambda logprobs, rows: topk_kl(flat_teacher[rows], logprobs[:, 1:])

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor], student_logprobs: torch.Tensor):
        ids, teacher = self.checked_inputs(batch, logits.shape[:2])
        return topk_kl(teacher, vocab_parallel_gather_logprobs(logits, ids, self.tp_group))
