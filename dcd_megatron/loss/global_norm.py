"""Exact global-batch weight normalisation, applied to the gradients after the backward pass.

The loss function back-propagates raw weights ``u_t`` and reports ``[sum u, count]`` per
micro-batch (key "global_norm", present only when ``normalize="global"``). With
``calculate_per_token_loss=True`` megatron divides gradients by the global token count N,
so multiplying every gradient by ``N / sum u`` (sums over all micro-batches and DP x CP
ranks) gives exactly the gradient of ``sum_t w_t * term_t / N`` with ``w = u * N / sum u``
of mean 1 over the global batch, without a second forward pass. This is the only module
that touches megatron's DDP gradient buffers.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from dcd_megatron.loss.weights import mean_one_factor

log = logging.getLogger(__name__)

REPORT_KEY = "global_norm"


def _device_of(model_chunks) -> torch.device:
    for chunk in model_chunks:
        for p in chunk.parameters():
            return p.device
    return torch.device("cpu")


def _scale(model_chunks, factor: float) -> None:
    """Multiply every gradient: megatron DDP buffers (main_grad) when present, else ``.grad``."""
    for chunk in model_chunks:
        if callable(getattr(chunk, "scale_gradients", None)):
            chunk.scale_gradients(factor)  # megatron DDP: the buffers behind every param.main_grad
            continue
        for p in chunk.parameters():
            grad = getattr(p, "main_grad", None)
            if grad is None:
                grad = p.grad
            if grad is not None:
                grad.mul_(factor)


def global_weight_factor(reports, *, pp_group=None, dp_cp_group=None, device=None) -> float:
    """``count / sum u`` over the step's reports on all DP x CP ranks, known on every PP stage.

    1.0 when the reports carry no "global_norm" entry (normalize "micro"/"none"), when no
    token is valid, or when every weight is 0 (the gradient is 0 then anyway).
    """
    device = device or torch.device("cpu")
    factor = torch.ones((), dtype=torch.float64, device=device)
    if reports:  # the last pipeline stage (all ranks of one dp_cp group share a stage)
        entries = [r[REPORT_KEY] for r in reports if REPORT_KEY in r]
        if entries:
            totals = torch.stack([e.to(device=device, dtype=torch.float64) for e in entries]).sum(0)
            factor = mean_one_factor(totals, dp_cp_group)  # all-reduces the totals
            weight_sum, count = totals[0], totals[1]
            if float(count) > 0 and float(weight_sum) <= 0:
                log.warning("every DCD weight of the step is 0; leaving the (zero) gradients unscaled")
    if pp_group is not None and dist.is_initialized() and dist.get_world_size(pp_group) > 1:
        last = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
        dist.broadcast(factor, src=last, group=pp_group)
    return float(factor)


def rescale_grads_for_global_weight_mean(model_chunks, reports, *, pp_group=None, dp_cp_group=None) -> float:
    """Scale all gradients so the step's weights have mean 1 over the global batch; return the factor.

    Call after ``forward_backward_func`` returns (``reports`` is its list of micro-batch
    report dicts, empty on non-last pipeline stages) and before gradient clipping and
    ``optimizer.step()``. A no-op returning 1.0 unless ``normalize="global"``.
    """
    factor = global_weight_factor(reports, pp_group=pp_group, dp_cp_group=dp_cp_group, device=_device_of(model_chunks))
    if factor != 1.0:
        _scale(model_chunks, factor)
    return factor
