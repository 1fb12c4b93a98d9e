"""The memory-bounded DCD loss: logits made and consumed a chunk of tokens at a time.

Instead of the vocabulary-sharded logits ``[b, s, V/tp]`` the loss gets the final hidden
states ``[b, s, h]`` (already in the tensor-parallel region: what megatron's output layer
would multiply) and the output-layer weight shard ``[V/tp, h]``. Per chunk of ``chunk_size``
tokens it computes ``logits = hidden_chunk @ W^T``, the vocab-parallel log-probability of
the target (one all-gather of two numbers per token over the TP group, as in
``logprobs.py``), and drops the logits. Extra peak memory: O(chunk x V/tp), not O(s x V/tp).

Two exact gradient schemes, both ``torch.autograd.Function``s:

- **fused** (per-token weights: ``sft``, ``sigmoid``, ``student_only``, ``tis`` with a fixed
  bias): the weight of token t is a function of ``s_t`` and ``a_t`` alone, so it is known as
  soon as the chunk's log-probs are. The forward pass then also computes the chunk's logits
  gradient ``-u_t (onehot - softmax)`` in the logits buffer and turns it at once into the
  hidden-state and weight gradients (two matmuls), as Liger-Kernel's fused linear
  cross-entropy does for plain CE. The output-layer work is one forward and two backward
  matmuls, as in the unchunked path; backward only scales the stored gradients.
- **recompute** (any weight, e.g. ``prefix``/``sequence``/median bias, which need every
  token's log-prob first): the forward pass keeps only the per-token log-sum-exp; backward
  recomputes each chunk's logits (one extra matmul) and forms the gradient from the upstream
  per-token gradient, with no collective.

Only loss-masked-in tokens are computed (a masked-out token has weight 0 and no gradient);
their log-prob is returned as 0. The tensor-parallel input handling (the all-reduce of the
hidden-state gradient, or the sequence-parallel gather) is done by the model's output layer
(``dcd_megatron.model.builder.return_hidden_states``), exactly as megatron's
``ColumnParallelLinear`` does, so it is not repeated here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcd_megatron.loss.report import build_report
from dcd_megatron.loss.weights import (
    _looks_along_rows,
    compute_weights,
    normalize_weights,
)

# coef(student_logprobs of the chunk [c] fp32, index of its rows [c]) -> dL/ds for those rows
Coefficient = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _group_world(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _chunk_forward(h: torch.Tensor, weight: torch.Tensor, local: torch.Tensor, owned: torch.Tensor, group, world: int):
    """Logits of one chunk and their vocab-parallel statistics.

    Returns ``e`` (fp32 ``exp(logits - row max)``, a buffer the caller may overwrite),
    the row max, the global log-sum-exp and the global target logit (fp32, ``[c]``).
    """
    z = F.linear(h, weight)  # [c, V/tp] in the activation dtype, as megatron's output layer
    x = z if z.dtype == torch.float32 else z.float()
    del z
    row_max = x.amax(dim=-1)
    picked = x.gather(1, local[:, None]).squeeze(1)
    target = torch.where(owned, picked, torch.zeros_like(picked))
    x.sub_(row_max[:, None]).exp_()
    lse = x.sum(dim=-1).log_().add_(row_max)
    if world > 1:
        stats = torch.stack([lse, target])  # one collective: every shard's (lse, target logit)
        parts = [torch.empty_like(stats) for _ in range(world)]
        dist.all_gather(parts, stats, group=group)
        gathered = torch.stack(parts)
        lse = torch.logsumexp(gathered[:, 0], dim=0)
        target = gathered[:, 1].sum(dim=0)
    return x, row_max, lse, target


def _logits_grad_into(e: torch.Tensor, scale: torch.Tensor, g: torch.Tensor, local, owned) -> torch.Tensor:
    """Turn ``e`` (rows of ``exp(x - m)``) into ``g * (onehot(y) - softmax(x))`` in place.

    ``scale`` is ``exp(m - lse)`` per row, so ``softmax = e * scale``.
    """
    e.mul_((scale * -g)[:, None])
    e.scatter_add_(1, local[:, None], torch.where(owned, g, torch.zeros_like(g))[:, None])
    return e


def _targets(targets: torch.Tensor, rank: int, shard: int):
    local = targets.to(torch.long) - rank * shard
    owned = (local >= 0) & (local < shard)
    return torch.where(owned, local, torch.zeros_like(local)), owned


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class _RecomputeLogProbs(torch.autograd.Function):
    """log p(target) of the rows ``idx`` of ``hidden`` [N, h]; backward recomputes the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, idx, group, chunk):
        rank, world = _group_world(group)
        local, owned = _targets(targets, rank, weight.shape[0])
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(idx.numel(), dtype=torch.float32, device=hidden.device)
        for c in _chunks(idx.numel(), chunk):
            rows = idx[c]
            e, _, lse, target = _chunk_forward(hidden[rows], weight, local[rows], owned[rows], group, world)
            del e
            lse_all[c] = lse
            out[rows] = target - lse
        ctx.group, ctx.chunk = group, chunk
        ctx.save_for_backward(hidden, weight, local, owned, idx, lse_all)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, local, owned, idx, lse_all = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32 if weight.dtype != torch.float32 else weight.dtype,
                             device=weight.device) if need_w else None
        g_all = grad_out.float()
        for c in _chunks(idx.numel(), ctx.chunk):
            rows = idx[c]
            h = hidden[rows]
            x = F.linear(h, weight)
            x = x if x.dtype == torch.float32 else x.float()
            x.sub_(lse_all[c][:, None]).exp_()  # softmax, from the saved global log-sum-exp
            gz = _logits_grad_into(x, torch.ones_like(lse_all[c]), g_all[rows], local[rows], owned[rows])
            gz = gz.to(weight.dtype)
            if need_h:
                grad_h[rows] = (gz @ weight).to(hidden.dtype)
            if need_w:
                if grad_w.dtype == gz.dtype:
                    grad_w.addmm_(gz.t(), h)
                else:
                    grad_w.add_(gz.t() @ h)
        if need_w and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


class _FusedWeightedLogProbs(torch.autograd.Function):
    """``loss = sum_t coef_t * s_t`` over the rows ``idx``, coefficients known per chunk.

    Returns ``(loss, s)``; ``s`` (fp32 [N], 0 outside ``idx``) carries no gradient. The
    gradients w.r.t. ``hidden`` and ``weight`` are computed in the forward pass.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, idx, group, chunk, coef: Coefficient):
        rank, world = _group_world(group)
        local, owned = _targets(targets, rank, weight.shape[0])
        need_h, need_w = ctx.needs_input_grad[:2]
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for c in _chunks(idx.numel(), chunk):
            rows = idx[c]
            h = hidden[rows]
            e, row_max, lse, target = _chunk_forward(h, weight, local[rows], owned[rows], group, world)
            s = target - lse
            out[rows] = s
            g = coef(s, rows).to(torch.float32)
            loss += (g.double() * s.double()).sum()
            if need_h or need_w:
                gz = _logits_grad_into(e, (row_max - lse).exp_(), g, local[rows], owned[rows]).to(weight.dtype)
                if need_h:
                    grad_h[rows] = (gz @ weight).to(hidden.dtype)
                if need_w:
                    if grad_w.dtype == gz.dtype:
                        grad_w.addmm_(gz.t(), h)
                    else:  # fp32 accumulator for low-precision weights
                        grad_w.add_(gz.t() @ h)
            del e
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        ctx.grads = (grad_h, grad_w)
        ctx.mark_non_differentiable(out)
        return loss.to(torch.float32), out

    @staticmethod
    def backward(ctx, grad_loss, grad_s):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # the loss is linear in the stored gradients: scale them (no host sync on the scalar)
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None, None


def _flat_inputs(name: str, hidden, weight, targets, chunk_size: int, mask):
    """Checked ``(hidden as [tokens, h], indices of the tokens to compute)`` for the public entry points."""
    if hidden.shape[:-1] != targets.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{name}: hidden {tuple(hidden.shape)} must be targets {tuple(targets.shape)} + [h] "
            f"and weight [V/tp, h], got weight {tuple(weight.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    idx = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else torch.arange(flat.shape[0], device=flat.device)
    return flat, idx


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    chunk_size: int = 1024,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 log p(target) ``[...]`` from hidden states ``[..., h]`` and the weight shard ``[V/tp, h]``.

    Equal to ``vocab_parallel_logprobs(F.linear(hidden, weight), targets, group)`` on the
    tokens where ``mask`` is true (all by default) and 0 elsewhere, differentiable w.r.t.
    ``hidden`` and ``weight``, with at most ``chunk_size`` tokens' logits alive at a time
    (backward recomputes them).
    """
    flat, idx = _flat_inputs("chunked_logprobs", hidden, weight, targets, chunk_size, mask)
    out = _RecomputeLogProbs.apply(flat, weight, targets.reshape(-1), idx, group, int(chunk_size))
    return out.view(targets.shape)


def fused_weighted_nll(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    coef: Coefficient,
    group: dist.ProcessGroup | None = None,
    *,
    chunk_size: int = 1024,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_t coef_t * s_t, s)``: a loss linear in the log-probs with per-chunk coefficients.

    ``coef(s_chunk, flat_rows)`` returns ``dL/ds`` for a chunk of tokens (detached; it may
    depend on ``s_chunk``, e.g. ``-u(s_t, a_t)``). ``s`` is the detached fp32 log-prob
    ``[...]`` (0 where ``mask`` is false). Gradients are computed in the forward pass.
    """
    flat, idx = _flat_inputs("fused_weighted_nll", hidden, weight, targets, chunk_size, mask)
    loss, s = _FusedWeightedLogProbs.apply(flat, weight, targets.reshape(-1), idx, group, int(chunk_size), coef)
    return loss, s.view(targets.shape)


def per_token_weights(config) -> bool:
    """Whether each token's weight depends only on its own log-probs (the fused scheme applies)."""
    return not _looks_along_rows(config)


def _micro_factor(weights: torch.Tensor, valid: torch.Tensor, cp_group) -> torch.Tensor:
    """The factor ``normalize_weights(..., "micro")`` multiplies every weight by (1 when all are 0)."""
    totals = torch.stack([torch.where(valid, weights, 0.0).sum().double(), valid.sum().double()])
    if cp_group is not None and dist.is_initialized() and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(totals, group=cp_group)
    weight_sum, count = totals[0], totals[1]
    factor = torch.where(weight_sum > 0, count / weight_sum.clamp(min=torch.finfo(torch.float64).tiny), 1.0)
    return factor.to(torch.float32)


def chunked_loss(fn, batch: Mapping[str, torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor):
    """The DCD loss function's result from final hidden states ``[b, s, h]`` and the weight shard.

    ``fn`` is the ``DCDLossFunction`` (config, groups, step); the result is the same
    ``(loss_sum, num_tokens, report)`` as from the logits, for the ``nll`` term.
    """
    from dcd_megatron.loss.loss_func import nll_term, validate_batch

    config = fn.config
    if fn.token_term is not nll_term:
        raise ValueError("the chunked DCD loss supports only the nll term; set loss.chunk_size=0 for other terms")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"chunked DCD loss: output_weight must be the [V/tp, h] output-layer weight, got {weight!r}")
    validate_batch(batch, hidden, config)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"chunked DCD loss: hidden states {tuple(hidden.shape)} do not match weight {tuple(weight.shape)}")
    labels, teacher = batch["labels"], batch.get("teacher_logprobs")
    valid = batch["loss_mask"] > 0

    teacher = fn.checked_teacher(labels, teacher, valid, weight.shape[0])

    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    chunk = config.chunk_size or max(1, labels.numel())  # 0: one chunk of every token
    frac = batch.get("response_frac")
    weighted = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if weighted and per_token_weights(config):
        flat_teacher = teacher.reshape(-1) if teacher is not None else None

        def coef(s_chunk: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            t = flat_teacher[rows][None] if flat_teacher is not None else None
            ones = torch.ones_like(s_chunk, dtype=torch.bool)[None]
            return -compute_weights(s_chunk[None], t, ones, config, step=fn.step).weights[0]

        raw_sum, student = fused_weighted_nll(
            hidden, weight, safe_labels, coef, fn.tp_group, chunk_size=chunk, mask=valid
        )
        result = compute_weights(
            student, teacher, valid, config, segment_ids=batch.get("segment_ids"), cp_group=fn.cp_group,
            cp_layout_name=fn.cp_layout, step=fn.step, want_response_frac=frac is None,
        )
        loss_sum = raw_sum  # sum_t coef_t * s_t = sum_t u_t * (-s_t)
        if config.normalize == "micro":  # one factor for every weight: count / sum u over the CP group
            loss_sum = loss_sum * _micro_factor(result.weights, valid, fn.cp_group)
    else:
        student = chunked_logprobs(hidden, weight, safe_labels, fn.tp_group, chunk_size=chunk, mask=valid)
        result = compute_weights(
            student, teacher, valid, config, segment_ids=batch.get("segment_ids"), cp_group=fn.cp_group,
            cp_layout_name=fn.cp_layout, step=fn.step, want_response_frac=frac is None,
        )
        weights = result.weights
        if config.normalize == "micro":
            weights = normalize_weights(weights, valid, "micro", group=fn.cp_group)
        term = -student
        loss_sum = torch.where(valid, weights * term, torch.zeros_like(term)).sum()
    num_tokens = valid.sum().to(torch.int)
    report = build_report(
        loss_sum=loss_sum, student_logprobs=student, result=result, valid=valid,
        response_frac=frac if frac is not None else result.response_frac,
        global_norm=config.normalize == "global",
    )
    return loss_sum, num_tokens, report
