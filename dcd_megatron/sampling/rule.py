"""The sampling rule, once: temperature, then top-k, then top-p, and the log-probs of the kept distribution.

`kept_distribution` is the one place the kept set is decided. The sampler picks tokens from it
and reads the log-probs it stores from the same fp32 tensors; a rescoring (`dcd-score` with
top-p/top-k) calls the same function, so both see one distribution by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KeptDistribution:
    """One step's distribution per row, in descending-probability order (all fp32).

    ``order[b, r]`` is the token at rank ``r``; ``probs`` its probability before truncation
    times 1 where kept, 0 where dropped (unnormalised: inverse-CDF sampling scales by the total);
    ``logprobs`` the log-probs of the renormalised kept distribution (-inf where dropped).
    """

    order: torch.Tensor  # int64 [b, V]
    probs: torch.Tensor  # fp32 [b, V]
    logprobs: torch.Tensor  # fp32 [b, V]


def kept_distribution(logits: torch.Tensor, *, temperature: float, top_p: float = 1.0, top_k: int = 0) -> KeptDistribution:
    """softmax(logits / T) over ``[b, V]`` logits, keeping the ``top_k`` most likely (0 = all), then the
    smallest set of those whose (renormalised) mass reaches ``top_p`` (the token that crosses it is kept,
    the top token always is)."""
    x = logits.float() / temperature
    probs = torch.softmax(x, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if 0 < top_k < sorted_probs.shape[-1]:
        keep[:, top_k:] = False
    if top_p < 1.0:
        p = sorted_probs
        if 0 < top_k < sorted_probs.shape[-1]:  # top-p acts on the top-k distribution, renormalised
            p = sorted_probs * keep
            p = p / p.sum(dim=-1, keepdim=True)
        mass_before = p.cumsum(dim=-1) - p
        keep &= mass_before < top_p
        keep[:, 0] = True
    if keep.all():
        kept_probs = sorted_probs
        logprobs = torch.log_softmax(x, dim=-1).gather(-1, order)
    else:
        kept_probs = sorted_probs * keep
        masked = torch.where(keep, x.gather(-1, order), torch.full_like(sorted_probs, float("-inf")))
        logprobs = torch.log_softmax(masked, dim=-1)
    return KeptDistribution(order, kept_probs, logprobs)


def pick(dist: KeptDistribution, uniforms: torch.Tensor) -> torch.Tensor:
    """Rank (into ``dist.order``) of the token each row draws: the first whose cumulative kept mass
    exceeds ``uniforms[b] * total`` (inverse CDF)."""
    cdf = dist.probs.cumsum(dim=-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    pos = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
    # a rounding tail past the last kept token falls back onto the last token with mass
    last_kept = (dist.probs > 0).sum(dim=-1, keepdim=True) - 1
    return torch.minimum(pos, last_kept).squeeze(-1)


@dataclass
class StepSample:
    """What one sampling step returns per row: the token, its log-prob under the kept renormalised
    distribution, and that distribution's top-K (past the kept set: the next most likely tokens
    before truncation, at log-prob -inf)."""

    tokens: torch.Tensor  # int64 [b]
    logprobs: torch.Tensor | None  # fp32 [b]; None at temperature 0 (greedy has no distribution)
    top_ids: torch.Tensor | None  # int64 [b, K]
    top_logprobs: torch.Tensor | None  # fp32 [b, K]


def sample_step(
    logits: torch.Tensor, *, temperature: float, top_p: float = 1.0, top_k: int = 0,
    uniforms: torch.Tensor | None, logprob_top_k: int = 0,
) -> StepSample:
    """Pick one token per row of ``logits`` [b, V] (argmax at temperature 0, else by inverse CDF of the
    kept distribution) and return its log-prob and top-K from the same tensors."""
    if temperature == 0.0:
        return StepSample(logits.float().argmax(dim=-1), None, None, None)
    if uniforms is None:
        raise ValueError("sampling (temperature > 0) needs one uniform per row")  # internal
    dist = kept_distribution(logits, temperature=temperature, top_p=top_p, top_k=top_k)
    rank = pick(dist, uniforms).unsqueeze(-1)
    tokens = dist.order.gather(-1, rank).squeeze(-1)
    logprobs = dist.logprobs.gather(-1, rank).squeeze(-1)
    top_ids = top_lps = None
    if logprob_top_k > 0:
        k = min(logprob_top_k, dist.order.shape[-1])
        top_ids, top_lps = dist.order[:, :k], dist.logprobs[:, :k]
    return StepSample(tokens, logprobs, top_ids, top_lps)


def next_tokens(logits: torch.Tensor, *, temperature: float, top_p: float, uniforms: torch.Tensor | None,
                top_k: int = 0) -> torch.Tensor:
    """Only the tokens of `sample_step` (the rule `dcd-eval` samples with)."""
    return sample_step(logits, temperature=temperature, top_p=top_p, top_k=top_k, uniforms=uniforms).tokens
