"""The memory-bounded DCD loss: logits made and consumed a chunk of tokens at a time.

Instead of the vocabulary-sharded logits ``[b, s, V/tp]`` the loss gets the final hidden
states ``[b, s, h]`` (already in the tensor-parallel region: what megatron's output layer
would multiply) and the output-layer weight shard ``[V/tp, h]``. Per chunk of ``chunk_size``
tokens it computes ``logits = hidden_chunk @ W^T``, the vocab-parallel log-probabilities of
``m`` ids per token (the target, and for the top-k KL term also the teacher's top-k ids;
each logit comes from the shard that owns the id, and one all-gather of ``1 + m`` numbers
per token over the TP group gives them and the log-sum-exp, as in ``logprobs.py`` and
``topk_kl.py``), and drops the logits. Extra peak memory: O(chunk x V/tp), not O(s x V/tp).
The per-token term is a function of those log-probs (``-s_t``, or the top-k KL), so its
logits gradient is ``sum_j g_j (onehot(i_j) - softmax)`` with ``g_j`` its gradient w.r.t.
the log-prob of id ``j``: a per-row multiple of the softmax plus a scatter.

Two exact gradient schemes, both ``torch.autograd.Function``s:

- **fused** (per-token weights: ``sft``, ``sigmoid``, ``student_only``, ``tis`` with a fixed
  bias): the weight of token t is a function of ``s_t`` and ``a_t`` alone, so it is known as
  soon as the chunk's log-probs are, and so is ``g = u_t * d term_t / d logprobs`` (autograd
  over the chunk's ``[c, m]`` log-probs, the same term function as the full-logits path). The
  forward pass then also computes the chunk's logits gradient in the logits buffer and turns
  it at once into the hidden-state and weight gradients (two matmuls), as Liger-Kernel's
  fused linear cross-entropy does for plain CE. The output-layer work is one forward and two
  backward matmuls, as in the unchunked path; backward only scales the stored gradients.
  With ``reference="initial"`` every weight is a function of the data alone (the frozen initial
  student's log-probs, the teacher's): the weights, those that look along the row included,
  are computed before the chunks and the fused scheme applies to every method.
  The trajectory discount (``loss.trajectory``, fixed bias, no context parallelism) looks back
  only: the chunks are in token order, so each chunk's weights follow from its own log-probs and
  the running product of each document's fork factors, carried from chunk to chunk (fused too).
- **recompute** (any weight, e.g. ``prefix``/``sequence``/median bias, which need every
  token's log-prob first): the forward pass keeps only the per-token log-sum-exp and returns
  the ``[b, s, m]`` log-probs, from which the weights and the term are computed with autograd
  as on the full logits; backward recomputes each chunk's logits (one extra matmul) and forms
  the gradient from the upstream ``[c, m]`` gradient, with no collective.

Only loss-masked-in tokens are computed (a masked-out token has weight 0 and no gradient);
their log-probs are returned as 0. The tensor-parallel input handling (the all-reduce of the
hidden-state gradient, or the sequence-parallel gather) is done by the model's output layer
(``dcd_megatron.model.builder.return_hidden_states``), exactly as megatron's
``ColumnParallelLinear`` does, so it is not repeated here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcd_megatron.loss.config import DCDConfig
from dcd_megatron.loss.contract import GatheredTerm, OnLogProbs, TokenTerm, checked_teacher, gate_entropy, validate_batch
from dcd_megatron.loss.logprobs import _combine_shards, _group_rank_size, _ids_grad_into, _local_ids
from dcd_megatron.loss.report import build_report
from dcd_megatron.loss import segments
from dcd_megatron.loss.weights import (
    REFERENCE_KEY,
    _looks_along_rows,
    causal_weights,
    compute_weights,
    gated_parts,
    mean_one_factor,
    normalize_weights,
    weight_totals,
)

# chunk_loss(log-probs of the chunk's ids [c, m] fp32, index of its rows [c])
#   -> (the chunk's loss, a scalar; d loss / d log-probs [c, m])
ChunkLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _chunk_forward(h: torch.Tensor, weight: torch.Tensor, local: torch.Tensor, owned: torch.Tensor, group, world: int):
    """Logits of one chunk and their vocab-parallel statistics.

    Returns ``e`` (fp32 ``exp(logits - row max)``, a buffer the caller may overwrite),
    the row max, the global log-sum-exp ``[c]`` and the log-probs of the ids ``[c, m]`` (fp32).
    """
    z = F.linear(h, weight)  # [c, V/tp] in the activation dtype, as megatron's output layer
    x = z if z.dtype == torch.float32 else z.float()
    del z
    row_max = x.amax(dim=-1)
    picked = x.gather(1, local).masked_fill_(~owned, 0.0)  # [c, m]: 0 on ids another shard owns
    x.sub_(row_max[:, None]).exp_()
    lse = x.sum(dim=-1).log_().add_(row_max)
    lse, picked = _combine_shards(lse, picked, group, world)  # one collective per chunk
    return x, row_max, lse, picked - lse[:, None]


def _grad_buffers(ctx, hidden, weight):
    """Zeroed gradients of ``hidden`` and (fp32, the accumulator) of ``weight``, None where not needed."""
    need_h, need_w = ctx.needs_input_grad[:2]
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    return grad_h, grad_w


def _add_matmul_grads(gz, h, weight, rows, grad_h, grad_w) -> None:
    """The chunk's logits gradient ``gz`` [c, V/tp] into the hidden-state rows and the weight gradient."""
    gz = gz.to(weight.dtype)
    if grad_h is not None:
        grad_h[rows] = (gz @ weight).to(grad_h.dtype)
    if grad_w is not None:
        if grad_w.dtype == gz.dtype:
            grad_w.addmm_(gz.t(), h)
        else:  # fp32 accumulator for low-precision weights
            grad_w.add_(gz.t() @ h)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class _RecomputeLogProbs(torch.autograd.Function):
    """log p(ids) ``[N, m]`` of the rows ``idx`` of ``hidden`` [N, h]; backward recomputes the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, idx, group, chunk):
        rank, world = _group_rank_size(group)
        local, owned = _local_ids(ids, rank, weight.shape[0])
        out = torch.zeros(ids.shape, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(idx.numel(), dtype=torch.float32, device=hidden.device)
        for c in _chunks(idx.numel(), chunk):
            rows = idx[c]
            e, _, lse, logprobs = _chunk_forward(hidden[rows], weight, local[rows], owned[rows], group, world)
            del e
            lse_all[c] = lse
            out[rows] = logprobs
        ctx.group, ctx.chunk = group, chunk
        ctx.save_for_backward(hidden, weight, local, owned, idx, lse_all)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, local, owned, idx, lse_all = ctx.saved_tensors
        grad_h, grad_w = _grad_buffers(ctx, hidden, weight)
        g_all = grad_out.float()
        for c in _chunks(idx.numel(), ctx.chunk):
            rows = idx[c]
            h = hidden[rows]
            x = F.linear(h, weight)
            x = x if x.dtype == torch.float32 else x.float()
            x.sub_(lse_all[c][:, None]).exp_()  # softmax, from the saved global log-sum-exp
            gz = _ids_grad_into(x, torch.ones_like(lse_all[c]), g_all[rows], local[rows], owned[rows])
            _add_matmul_grads(gz, h, weight, rows, grad_h, grad_w)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


class _FusedChunkLoss(torch.autograd.Function):
    """``loss = sum over chunks of chunk_loss(log-probs of the chunk's ids)`` over the rows ``idx``.

    Returns ``(loss, logprobs)``; ``logprobs`` (fp32 [N, m], 0 outside ``idx``) carries no
    gradient. The gradients w.r.t. ``hidden`` and ``weight`` are computed in the forward pass
    from the ``d loss / d log-probs`` that ``chunk_loss`` returns with each chunk's loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, ids, idx, group, chunk, chunk_loss: ChunkLoss):
        rank, world = _group_rank_size(group)
        local, owned = _local_ids(ids, rank, weight.shape[0])
        out = torch.zeros(ids.shape, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
        grad_h, grad_w = _grad_buffers(ctx, hidden, weight)
        for c in _chunks(idx.numel(), chunk):
            rows = idx[c]
            h = hidden[rows]
            e, row_max, lse, logprobs = _chunk_forward(h, weight, local[rows], owned[rows], group, world)
            out[rows] = logprobs
            value, g = chunk_loss(logprobs, rows)
            loss += value
            if grad_h is not None or grad_w is not None:
                gz = _ids_grad_into(e, (row_max - lse).exp_(), g.to(torch.float32), local[rows], owned[rows])
                _add_matmul_grads(gz, h, weight, rows, grad_h, grad_w)
            del e
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        ctx.grads = (grad_h, grad_w)
        ctx.mark_non_differentiable(out)
        return loss.to(torch.float32), out

    @staticmethod
    def backward(ctx, grad_loss, grad_logprobs):
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        # the loss is linear in the stored gradients: scale them (no host sync on the scalar)
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None, None


def _flat_inputs(name: str, hidden, weight, ids, chunk_size: int, mask):
    """Checked ``(hidden as [tokens, h], ids as [tokens, m], indices of the tokens to compute)``.

    ``ids`` is ``[...]`` (one id a token) or ``[..., m]`` with ``hidden`` ``[..., h]``.
    """
    lead = hidden.shape[:-1]
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or not (
        ids.shape == lead or (ids.dim() == hidden.dim() and ids.shape[:-1] == lead)
    ):
        raise ValueError(
            f"{name}: hidden {tuple(hidden.shape)} must be ids {tuple(ids.shape)} (or ids without their "
            f"last dimension) + [h] and weight [V/tp, h], got weight {tuple(weight.shape)}"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name}: ids must be integer token ids, got {ids.dtype}")
    if chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    idx = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else torch.arange(flat.shape[0], device=flat.device)
    return flat, ids.reshape(flat.shape[0], -1), idx


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    chunk_size: int = 1024,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 log p(ids), shaped like ``ids``, from hidden states ``[..., h]`` and the weight shard ``[V/tp, h]``.

    ``ids`` is ``[...]`` (e.g. the targets) or ``[..., m]`` (several ids a token, e.g. the
    label and the teacher's top-k). Equal to ``vocab_parallel_logprobs(F.linear(hidden,
    weight), ids, group)`` (resp. ``vocab_parallel_gather_logprobs``) on the tokens where
    ``mask`` is true (all by default) and 0 elsewhere, differentiable w.r.t. ``hidden`` and
    ``weight``, with at most ``chunk_size`` tokens' logits alive at a time (backward
    recomputes them).
    """
    flat, flat_ids, idx = _flat_inputs("chunked_logprobs", hidden, weight, ids, chunk_size, mask)
    out = _RecomputeLogProbs.apply(flat, weight, flat_ids, idx, group, int(chunk_size))
    return out.view(ids.shape)


def fused_chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    chunk_loss: ChunkLoss,
    group: dist.ProcessGroup | None = None,
    *,
    chunk_size: int = 1024,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum over chunks of chunk_loss, log p(ids))``: a loss known chunk by chunk from the log-probs.

    ``chunk_loss(logprobs [c, m], flat_rows)`` returns the chunk's loss and its (detached)
    gradient w.r.t. those log-probs; it may depend on them (e.g. ``-u(s_t, a_t) * s_t``).
    The returned log-probs are detached fp32, shaped ``ids`` (0 where ``mask`` is false).
    Gradients w.r.t. ``hidden`` and ``weight`` are computed in the forward pass.
    """
    flat, flat_ids, idx = _flat_inputs("fused_chunked_loss", hidden, weight, ids, chunk_size, mask)
    loss, out = _FusedChunkLoss.apply(flat, weight, flat_ids, idx, group, int(chunk_size), chunk_loss)
    return loss, out.view(ids.shape)


def per_token_weights(config) -> bool:
    """Whether each token's weight depends only on its own log-probs (the fused scheme applies)."""
    return not _looks_along_rows(config)


def weights_before_forward(config) -> bool:
    """Whether the weights are known from the batch alone (the frozen initial student's log-probs)."""
    return config.needs_reference


def _gathered_term(term: TokenTerm, batch: Mapping[str, torch.Tensor], shape) -> tuple[torch.Tensor | None, OnLogProbs]:
    """``(the ids the term reads [b, s, k] or None, the term from the log-probs of (label, ids) a row)``."""
    if not isinstance(term, GatheredTerm):
        raise ValueError(
            "the chunked DCD loss supports the nll and topk_kl terms (terms with `gathered`, "
            "dcd_megatron.loss.contract.GatheredTerm); set loss.chunk_size=0 for other terms"
        )
    return term.gathered(batch, shape)


def _spans_ranks(group) -> bool:
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1


class _TrajectoryCarry:
    """The trajectory discount chunk by chunk in token order: each document's running sum of log fork
    factors is carried from one chunk to the next (the chunks hold the trained tokens, row-major)."""

    def __init__(self, config: DCDConfig, step: int, docs: torch.Tensor, teacher: torch.Tensor):
        self.config, self.tau = config, config.tau_at(step)
        self.docs, self.teacher = docs.reshape(-1), teacher.reshape(-1).to(torch.float32)
        self.doc, self.total = -1, torch.zeros((), dtype=torch.float64, device=docs.device)

    def __call__(self, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        a = self.teacher[rows]
        ones = torch.ones_like(s, dtype=torch.bool)
        u, fork = gated_parts(s.detach().float(), s.detach().float() - a, ones, self.config, self.tau, gate_in=a)
        docs = self.docs[rows]
        log_fork = fork.to(torch.float64).clamp(min=1e-300).log()
        before = log_fork.cumsum(0) - log_fork  # exclusive, over the chunk
        starts = torch.ones_like(docs, dtype=torch.bool)
        starts[1:] = docs[1:] != docs[:-1]
        first = torch.cummax(torch.where(starts, torch.arange(len(docs), device=docs.device), 0), 0).values
        within = before - before[first]  # reset where a document starts in the chunk
        within = within + torch.where(docs == self.doc, self.total, torch.zeros_like(self.total))
        self.total = within[-1] + log_fork[-1]
        self.doc = int(docs[-1])
        w = u * within.exp().to(u.dtype)
        return w.clamp(min=self.config.floor, max=self.config.cap)


def _fused_loss(hidden, weight, ids, valid, on_logprobs: OnLogProbs, config: DCDConfig, *, step: int, chunk: int,
                tp_group, teacher, entropy, known, docs=None):
    """``(sum_t u_t * term_t, log-probs)`` by the fused scheme: ``u`` from ``known`` (weights computed
    from the batch before the forward pass), carried along the row (``docs``: the trajectory discount),
    or, per token, from each chunk's own log-probs."""
    flat_teacher = teacher.reshape(-1) if teacher is not None else None
    flat_entropy = entropy.reshape(-1) if entropy is not None else None
    flat_u = known.reshape(-1) if known is not None else None
    carry = _TrajectoryCarry(config, step, docs, teacher) if docs is not None else None

    def chunk_weights(logprobs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if flat_u is not None:
            return flat_u[rows]
        if carry is not None:
            return carry(logprobs[:, 0], rows)
        t = flat_teacher[rows][None] if flat_teacher is not None else None
        h = flat_entropy[rows][None] if flat_entropy is not None else None
        ones = torch.ones(logprobs.shape[:1], dtype=torch.bool, device=logprobs.device)[None]
        return compute_weights(logprobs[None, :, 0], t, ones, config, step=step, entropy=h).weights[0]

    def chunk_loss(logprobs: torch.Tensor, rows: torch.Tensor):
        u = chunk_weights(logprobs, rows)
        with torch.enable_grad():  # the term's gradient w.r.t. the chunk's [c, 1 + k] log-probs
            x = logprobs.detach().requires_grad_()
            value = (u.double() * on_logprobs(x, rows).double()).sum()
            (grad,) = torch.autograd.grad(value, x)
        return value.detach(), grad

    return fused_chunked_loss(hidden, weight, ids, chunk_loss, tp_group, chunk_size=chunk, mask=valid)


def chunked_loss(
    batch: Mapping[str, torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    config: DCDConfig,
    term: TokenTerm,
    tp_group=None,
    cp_group=None,
    cp_layout: str | None = None,
    step: int = 0,
):
    """The DCD loss function's result from final hidden states ``[b, s, h]`` and the weight shard.

    The same ``(loss_sum, num_tokens, report)`` as ``DCDLossFunction`` from the logits, with its
    config, groups, step and per-token term (a ``GatheredTerm``: ``nll`` or the top-k KL). Each
    chunk gathers the log-probs of ``(label, the term's ids)`` per token: the label's feeds the
    weights and the report, the term reads them all (``GatheredTerm.gathered``).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"chunked DCD loss: output_weight must be the [V/tp, h] output-layer weight, got {weight!r}")
    validate_batch(batch, hidden, config)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"chunked DCD loss: hidden states {tuple(hidden.shape)} do not match weight {tuple(weight.shape)}")
    labels, teacher = batch["labels"], batch.get("teacher_logprobs")
    valid = batch["loss_mask"] > 0

    reference = batch.get(REFERENCE_KEY)
    teacher = checked_teacher(config, labels, teacher, valid, weight.shape[0] * _group_rank_size(tp_group)[1], reference)
    term_ids, on_logprobs = _gathered_term(term, batch, labels.shape)

    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).to(torch.long)
    ids = safe_labels[..., None]
    if term_ids is not None:
        ids = torch.cat([ids, term_ids.to(torch.long)], dim=-1)  # [b, s, 1 + k]
    chunk = config.chunk_size or max(1, labels.numel())  # 0: one chunk of every token
    frac = batch.get("response_frac")
    entropy = gate_entropy(batch, config)
    rows_kw = dict(segment_ids=batch.get("segment_ids"), cp_group=cp_group, cp_layout_name=cp_layout, step=step,
                   want_response_frac=frac is None, entropy=entropy, reference_logprobs=reference)
    known = weights_before_forward(config)
    result = compute_weights(reference, teacher, valid, config, **rows_kw) if known else None
    causal = not known and causal_weights(config) and not _spans_ranks(cp_group)
    fused = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad) and (
        known or causal or per_token_weights(config))
    if fused:
        docs = segments.document_ids(batch.get("segment_ids"), labels.shape, labels.device) if causal else None
        loss_sum, logprobs = _fused_loss(hidden, weight, ids, valid, on_logprobs, config, step=step, chunk=chunk,
                                         tp_group=tp_group, teacher=teacher, entropy=entropy,
                                         known=result.weights if known else None, docs=docs)
    else:  # the recompute scheme (or no gradient): log-probs first, the loss from them with autograd
        logprobs = chunked_logprobs(hidden, weight, ids, tp_group, chunk_size=chunk, mask=valid)
    student = logprobs[..., 0]
    if result is None:
        result = compute_weights(student, teacher, valid, config, **rows_kw)
    if fused:  # sum_t u_t * term_t, already summed chunk by chunk
        if config.normalize == "micro":  # one factor for every weight: count / sum u over the CP group
            loss_sum = loss_sum * mean_one_factor(weight_totals(result.weights, valid), cp_group).to(torch.float32)
    else:
        weights = result.weights
        if config.normalize == "micro":
            weights = normalize_weights(weights, valid, "micro", group=cp_group)
        flat = logprobs.reshape(-1, ids.shape[-1])
        per_token = on_logprobs(flat, torch.arange(flat.shape[0], device=flat.device)).view(labels.shape)
        loss_sum = torch.where(valid, weights * per_token, torch.zeros_like(per_token)).sum()
    num_tokens = valid.sum().to(torch.int)
    report = build_report(
        loss_sum=loss_sum, student_logprobs=student, result=result, valid=valid,
        response_frac=frac if frac is not None else result.response_frac,
        global_norm=config.normalize == "global",
    )
    return loss_sum, num_tokens, report
