"""Teacher log-probabilities of given tokens, and its top-k, from (possibly vocab-sharded) logits.

One code path serves TP=1 and TP>1: with a tensor-parallel group, each rank holds logits for
vocabulary ids [vocab_start, vocab_start + width) and the log-sum-exp, the target logit and
the top-k candidates are combined across the group. Columns >= `vocab_size` (megatron's
padding) are excluded. All math in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _all_reduce(x: Tensor, op, group) -> Tensor:
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(x, op=op, group=group)
    return x


def scored_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    group=None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """log_softmax(logits / T) at `targets`, plus the top-k (ids, log-probs) when `top_k` > 0.

    `logits` is `[n, width]` (this rank's vocabulary slice), `targets` `[n]` global token ids.
    Returns fp32 `[n]`, int64 `[n, k]`, fp32 `[n, k]` (top-k sorted by decreasing log-prob).
    """
    x = logits.float() / temperature
    width = x.shape[-1]
    if vocab_size is not None and vocab_start + width > vocab_size:
        valid = max(0, vocab_size - vocab_start)
        x = x.clone()
        x[:, valid:] = float("-inf")
    op = torch.distributed.ReduceOp
    m = _all_reduce(x.max(dim=-1).values.clone(), op.MAX, group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    sum_exp = _all_reduce(torch.exp(x - m[:, None]).sum(dim=-1), op.SUM, group)
    lse = m + torch.log(sum_exp)
    local = targets - vocab_start
    mine = (local >= 0) & (local < width)
    target_logit = torch.where(mine, x.gather(1, local.clamp(0, width - 1)[:, None])[:, 0], torch.zeros_like(m))
    target_logit = _all_reduce(target_logit, op.SUM, group)
    logprobs = target_logit - lse
    if top_k <= 0:
        return logprobs, None, None
    k = min(top_k, width)
    values, ids = torch.topk(x, k, dim=-1)
    ids = ids + vocab_start
    if group is not None and torch.distributed.get_world_size(group) > 1:
        n = torch.distributed.get_world_size(group)
        all_v = [torch.empty_like(values) for _ in range(n)]
        all_i = [torch.empty_like(ids) for _ in range(n)]
        torch.distributed.all_gather(all_v, values.contiguous(), group=group)
        torch.distributed.all_gather(all_i, ids.contiguous(), group=group)
        values, ids = torch.cat(all_v, dim=-1), torch.cat(all_i, dim=-1)
    values, order = torch.topk(values, min(top_k, values.shape[-1]), dim=-1)
    return logprobs, ids.gather(1, order), values - lse[:, None]
