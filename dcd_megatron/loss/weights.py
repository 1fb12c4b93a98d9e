"""The per-token weight family of the method (docs/loss.md), as detached ``[b, s]`` tensors.

Layout: every per-token tensor here is ``[b, s]`` (batch first, as megatron's GPTModel
returns logits when ``labels=None``); with context parallelism ``s`` is this CP rank's part.
All weight math uses ``sg(l)``, ``l = s - a`` (student minus teacher log-prob; with
``reference="initial"`` ``s`` is the frozen initial student's log-prob, a column of the data,
so the weights are known before the forward pass). The raw
weights ``u`` are clamped to ``[floor, cap]`` (except ``sft``) and are 0 on masked-out tokens;
making them mean-1 is ``normalize_weights`` or, for the global batch,
``global_norm.rescale_grads_for_global_weight_mean``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from dcd_megatron.loss import cp_layout, segments
from dcd_megatron.loss.config import DCDConfig


@dataclasses.dataclass
class WeightResult:
    """Raw weights and the diagnostics computed on the way (all ``[b, s]``, detached)."""

    weights: torch.Tensor  # u, clamped, 0 on masked-out tokens
    at_cap: torch.Tensor  # bool: the unclamped weight was above cap
    at_floor: torch.Tensor  # bool: the unclamped weight was below floor
    log_ratio: torch.Tensor | None  # l = s - a (0 on masked-out tokens), None without teacher
    response_frac: torch.Tensor | None  # derived position in the response, if it was asked for


def check_teacher(config: DCDConfig, teacher_logprobs: torch.Tensor | None) -> None:
    """A clear error when the method needs teacher log-probs and none were given."""
    if teacher_logprobs is None and config.needs_teacher:
        raise ValueError(
            f"DCD method {config.method!r} needs teacher log-probs (batch key 'teacher_logprobs'): "
            "add per-token teacher log-probs to the traces, or compute them with `dcd-score`; "
            "methods 'sft' and 'student_only' need none"
        )


REFERENCE_KEY = "student_ref_logprobs"


def check_reference(config: DCDConfig, reference_logprobs: torch.Tensor | None) -> None:
    """A clear error when the weights should read the initial student's log-probs and none were given."""
    if reference_logprobs is None and config.needs_reference:
        raise ValueError(
            f"loss.reference=initial needs the initial student's log-probs (batch key {REFERENCE_KEY!r}): "
            "score the traces once with the checkpoint the run starts from (`dcd-score --reference "
            "--teacher INIT_CHECKPOINT ...`), or set loss.reference=live"
        )


def raise_for_nonfinite_reference(count: int) -> None:
    if count:
        raise ValueError(
            f"{REFERENCE_KEY} has {count} NaN/inf value(s) on loss-masked-in tokens; score every trained "
            "token with the initial student (`dcd-score --reference`) or set loss.reference=live"
        )


def nonfinite_teacher_count(teacher_logprobs: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    """Number of masked-in tokens whose teacher log-prob is NaN or infinite (a device tensor)."""
    if teacher_logprobs is None:
        return torch.zeros((), dtype=torch.long, device=valid.device)
    return (~torch.isfinite(teacher_logprobs) & valid).sum()


def raise_for_nonfinite_teacher(count: int) -> None:
    if count:
        raise ValueError(
            f"teacher_logprobs has {count} NaN/inf value(s) on loss-masked-in tokens; "
            "re-score those traces (`dcd-score`) or set their loss_mask to 0"
        )


def _sigmoid_weight(z: torch.Tensor, valid: torch.Tensor, config: DCDConfig, tau: float) -> torch.Tensor:
    """sigma((z - b) / tau), b fixed or the masked median of z over the rows given."""
    bias = segments.masked_median(z, valid).to(z.dtype) if config.bias_mode == "median" else config.bias
    return torch.sigmoid((z - bias) / tau)


def teacher_entropy(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the teacher's top-k plus one residual bucket, ``[..., k] -> [...]``, fp32.

    Unknown entries (NaN) count as probability 0; the residual bucket holds ``1 - sum p``.
    """
    lp = topk_logprobs.detach().to(torch.float32)
    known = torch.isfinite(lp)
    p = torch.where(known, lp.exp(), torch.zeros_like(lp))
    h = -(p * torch.where(known, lp, torch.zeros_like(lp))).sum(-1)
    r = (1.0 - p.sum(-1)).clamp(min=0.0)
    return h - torch.where(r > 0, r * r.clamp(min=1e-30).log(), torch.zeros_like(r))


def checked_entropy(
    topk_logprobs: torch.Tensor | None, valid: torch.Tensor, config: DCDConfig
) -> torch.Tensor | None:
    """The teacher's entropy ``[b, s]`` for the entropy gate (None when not asked for), after checking its top-k."""
    if not config.entropy_gate:
        return None
    shape = tuple(valid.shape)
    if topk_logprobs is None:
        raise ValueError("loss.gate=entropy needs teacher top-k in the batch: score the traces with "
                         "`dcd-score --top-k K` and set data.topk=K, or use loss.gate=token")
    if topk_logprobs.dim() != 3 or tuple(topk_logprobs.shape[:2]) != shape:
        raise ValueError(f"teacher_topk_logprobs {tuple(topk_logprobs.shape)} must be [b, s, k] with [b, s] = {shape}; "
                         "pass the teacher's top-k log-probs of every position")
    missing = int((valid & ~torch.isfinite(topk_logprobs).any(dim=-1)).sum())
    if missing:
        raise ValueError(f"loss.gate=entropy: {missing} trained token(s) have no teacher top-k; rescore with "
                         "`dcd-score --top-k` including the eos, or use loss.gate=token")
    return teacher_entropy(topk_logprobs)


def gate_values(gate_in: torch.Tensor, config: DCDConfig) -> torch.Tensor:
    """The gated method's teacher-confidence gate ``exp(gate_power * gate_in)`` in [0, 1].

    ``gate_in`` is the log-confidence: the teacher log-prob of its token ("token" gate) or
    minus the teacher's entropy ("entropy" gate); ``gate_power=0`` gives 1 everywhere (SFT).
    """
    return torch.exp(config.gate_power * gate_in.clamp(max=0.0))


def raw_weights_on_rows(
    s: torch.Tensor,
    l: torch.Tensor | None,
    valid: torch.Tensor,
    segment_ids: torch.Tensor | None,
    config: DCDConfig,
    tau: float,
    gate_in: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unclamped weights of whole rows ``[b, S]`` (the single-process definition of each method).

    ``gate_in`` ``[b, S]`` is the gated method's log-confidence (default: the teacher log-prob
    ``s - l``).
    """
    c = config.clip
    method = config.method
    if method == "sft":
        return torch.ones_like(s)
    if method in ("sigmoid", "gated"):
        u, fork = gated_parts(s, l, valid, config, tau, gate_in)
        return u * trajectory_discount(fork, valid, segment_ids) if config.uses_trajectory else u
    if method == "student_only":
        if config.student_only_form == "power":
            return torch.exp(config.beta * s)  # p ** beta
        return _sigmoid_weight(s.clamp(-c, c), valid, config, tau)
    if method == "tis":
        return torch.exp(config.alpha * l.clamp(-c, c))
    docs = segments.document_ids(segment_ids, s.shape, s.device)
    if method == "prefix":
        mean, _ = segments.prefix_mean(l, valid, docs, config.prefix_window)
        z = mean.to(torch.float32).clamp(-c, c)
        if config.prefix_transform == "exp":
            return torch.exp(z)
        return _sigmoid_weight(z, valid, config, tau)
    if method == "sequence":
        mean, _ = segments.document_mean(l, valid, docs)
        return torch.exp(mean.to(torch.float32).clamp(-c, c))
    raise ValueError(f"unknown DCD method {method!r}")  # DCDConfig validates; guards additions


def gated_parts(s, l, valid, config: DCDConfig, tau: float, gate_in=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, fork)`` of the sigmoid-shaped methods: the token's own weight ``g + (1 - g) sigma`` and
    its fork factor ``g + (1 - g) min(1, 2 sigma)`` (``g = 0`` for ``sigmoid``; ``gate_in`` as in
    ``raw_weights_on_rows``)."""
    if config.method == "gated":
        g = gate_values(s - l if gate_in is None else gate_in, config)
    else:
        g = torch.zeros_like(s)
    sig = _sigmoid_weight(l.clamp(-config.clip, config.clip), valid, config, tau)
    return g + (1.0 - g) * sig, g + (1.0 - g) * (2.0 * sig).clamp(max=1.0)


def causal_weights(config: DCDConfig) -> bool:
    """Whether a weight looks back along its row only, by the trajectory discount of a per-token weight
    (fixed bias, the token gate): known token by token in order, from the earlier tokens' fork factors."""
    return config.uses_trajectory and config.bias_mode == "fixed" and not config.entropy_gate


def trajectory_discount(fork: torch.Tensor, valid: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """``prod_{k < t} fork_k`` over the earlier response tokens of each token's document (1 at
    its first), from a prefix sum of ``log fork`` that resets at every packed-document boundary."""
    docs = segments.document_ids(segment_ids, fork.shape, fork.device)
    log_fork = torch.where(valid, fork.to(torch.float64).clamp(min=1e-300).log(), 0.0)
    return segments.prefix_sum(log_fork, valid, docs).exp().to(fork.dtype)


def _looks_along_rows(config: DCDConfig) -> bool:
    """Whether a weight depends on other tokens of the micro-batch (needs full rows under CP)."""
    if config.method in ("prefix", "sequence") or config.uses_trajectory:
        return True
    sigmoid_shaped = config.method in ("sigmoid", "gated") or (
        config.method == "student_only" and config.student_only_form == "sigmoid"
    )
    return sigmoid_shaped and config.bias_mode == "median"


def compute_weights(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    valid: torch.Tensor,
    config: DCDConfig,
    *,
    segment_ids: torch.Tensor | None = None,
    cp_group=None,
    cp_layout_name: str | None = None,
    step: int = 0,
    want_response_frac: bool = False,
    entropy: torch.Tensor | None = None,
    reference_logprobs: torch.Tensor | None = None,
) -> WeightResult:
    """Raw weights plus diagnostics; inputs must already be validated (see dcd_weights).

    With ``config.reference="initial"`` the student statistic is ``reference_logprobs`` (the frozen
    initial student's, ``[b, s]``) instead of ``student_logprobs``.

    Under context parallelism, weights that look along the sequence are evaluated on the
    full rows (one all-gather of per-token numbers over ``cp_group``) and sliced back.
    ``entropy`` ``[b, s]`` is the teacher's entropy (``teacher_entropy``), read only by the
    gated method's entropy gate.
    """
    s = (reference_logprobs if config.needs_reference else student_logprobs).detach().to(torch.float32)
    zeros = torch.zeros_like(s)
    s = torch.where(valid, s, zeros)
    l = None
    if teacher_logprobs is not None:
        l = torch.where(valid, s - teacher_logprobs.detach().to(torch.float32), zeros)
    tau = config.tau_at(step)
    layout = cp_layout.resolve_layout(cp_group, cp_layout_name)
    gate_in = None  # the gated method's log-confidence: a (exact, not s - l in fp32) or -H
    if config.entropy_gate:
        if entropy is None:
            raise ValueError("loss.gate=entropy needs the teacher's top-k in the batch: score the traces with "
                             "`dcd-score --top-k K` and set data.topk=K, or use loss.gate=token")
        gate_in = torch.where(valid, -entropy.detach().to(torch.float32), zeros)
    elif config.method == "gated" and teacher_logprobs is not None:
        gate_in = torch.where(valid, teacher_logprobs.detach().to(torch.float32), zeros)

    need_rows = layout is not None and (_looks_along_rows(config) or want_response_frac)
    if need_rows:
        local = [s, l if l is not None else zeros, valid, gate_in if gate_in is not None else zeros]
        if segment_ids is not None:
            local.append(segment_ids)
        gathered = cp_layout.gather_full(local, cp_group, layout)
        s_rows, l_rows, valid_rows, gate_rows = gathered[:4]
        seg_rows = gathered[4] if segment_ids is not None else None
        raw_rows = raw_weights_on_rows(s_rows, l_rows if l is not None else None, valid_rows, seg_rows, config, tau,
                                       gate_rows if gate_in is not None else None)
        raw = cp_layout.local_part(raw_rows, cp_group, layout)
    else:
        valid_rows, seg_rows = valid, segment_ids
        raw = raw_weights_on_rows(s, l, valid, segment_ids, config, tau, gate_in)

    if config.method == "sft":
        at_cap = at_floor = torch.zeros_like(valid)
        u = raw
    else:
        at_cap = (raw > config.cap) & valid
        at_floor = (raw < config.floor) & valid
        u = raw.clamp(min=config.floor, max=config.cap)
    u = torch.where(valid, u, zeros)

    frac = None
    if want_response_frac:
        docs = segments.document_ids(seg_rows, valid_rows.shape, valid_rows.device)
        frac = cp_layout.local_part(segments.response_position(valid_rows, docs), cp_group, layout)
    return WeightResult(u, at_cap, at_floor, l, frac)


def validate_token_tensors(names_and_tensors: dict[str, torch.Tensor | None], reference: str) -> None:
    """Every given tensor has the ``[b, s]`` shape of ``names_and_tensors[reference]``."""
    shape = names_and_tensors[reference].shape
    if len(shape) != 2:
        raise ValueError(f"{reference} must be [b, s], got shape {tuple(shape)}")
    for name, t in names_and_tensors.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {reference} has {tuple(shape)}; all per-token tensors must be [b, s]")


def dcd_weights(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor | None,
    loss_mask: torch.Tensor,
    config: DCDConfig,
    *,
    segment_ids: torch.Tensor | None = None,
    cp_group: dist.ProcessGroup | None = None,
    cp_layout: str | None = None,
    step: int = 0,
    teacher_topk_logprobs: torch.Tensor | None = None,
    reference_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw (un-normalised), detached DCD weights ``u`` ``[b, s]``; 0 where ``loss_mask`` is 0.

    ``segment_ids`` ``[b, s]`` marks packed documents (prefix/document sums reset where it
    changes). With ``cp_group`` of size > 1 the tensors are this CP rank's part in
    ``cp_layout`` ("load_balanced" by default, or "contiguous") and prefix, document and
    median statistics are exact over the full sequence (raw weights never look across
    data-parallel ranks). ``step`` is the optimizer step for the tau schedule. ``teacher_topk_logprobs``
    ``[b, s, k]`` feeds the gated method's entropy gate (``loss.gate=entropy``); ``reference_logprobs``
    ``[b, s]`` is the initial student's log-prob of each label (read with ``reference="initial"``).
    """
    validate_token_tensors(
        {"student_logprobs": student_logprobs, "teacher_logprobs": teacher_logprobs,
         "loss_mask": loss_mask, "segment_ids": segment_ids, REFERENCE_KEY: reference_logprobs},
        "student_logprobs",
    )
    check_teacher(config, teacher_logprobs)
    check_reference(config, reference_logprobs)
    valid = loss_mask > 0
    raise_for_nonfinite_teacher(int(nonfinite_teacher_count(teacher_logprobs, valid)))
    if config.needs_reference:
        raise_for_nonfinite_reference(int(nonfinite_teacher_count(reference_logprobs, valid)))
    entropy = checked_entropy(teacher_topk_logprobs, valid, config)
    return compute_weights(
        student_logprobs, teacher_logprobs, valid, config,
        segment_ids=segment_ids, cp_group=cp_group, cp_layout_name=cp_layout, step=step, entropy=entropy,
        reference_logprobs=reference_logprobs,
    ).weights


def normalize_weights(
    weights: torch.Tensor,
    loss_mask: torch.Tensor,
    scope: str,
    *,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Weights scaled to mean 1 over the masked-in tokens of ``scope``.

    "none" returns them unchanged; "micro" and "global" divide by the mean over this tensor's
    tokens summed over ``group`` (the micro-batch's CP group for "micro"; the DP x CP group
    for "global" when a step is a single micro-batch; with several micro-batches "global"
    is done exactly by ``rescale_grads_for_global_weight_mean`` instead). An all-masked or
    all-zero scope is returned unchanged.
    """
    if scope == "none":
        return weights
    if scope not in ("micro", "global"):
        raise ValueError(f"normalize scope {scope!r} is not one of ['global', 'micro', 'none']")
    return weights * mean_one_factor(weight_totals(weights, loss_mask > 0), group).to(weights.dtype)


def weight_totals(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[sum of the weights, count]`` (fp64) over the ``valid`` tokens."""
    return torch.stack([torch.where(valid, weights, 0.0).sum().double(), valid.sum().double()])


def mean_one_factor(totals: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``count / sum`` (fp64) from ``totals = [sum of the weights, count]`` summed over ``group``
    (all-reduced in place): the factor that gives the weights mean 1; 1 where they sum to 0."""
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    weight_sum, count = totals[0], totals[1]
    return torch.where(weight_sum > 0, count / weight_sum.clamp(min=torch.finfo(torch.float64).tiny), 1.0)
