"""Exposure bias as accumulated error: AccErr and ExAccErr after Arora et al. (2022).

Arora, El Asri, Bahuleyan, Cheung, "Why Exposure Bias Matters: An Imitation Learning
Perspective of Error Accumulation in Language Generation" (Findings of ACL 2022,
arXiv:2204.01171; code: github.com/kushalarora/quantifying_exposure_bias). With an oracle
policy o, a model h and a per-step loss l(s_t, h) that is zero for the oracle itself:

    eps_<=l(h) = (1/l) sum_{t<=l} E_{s_t ~ d_o^t} l(s_t, h)   error on oracle (teacher) prefixes
    R_<=l(h)   =       sum_{t<=l} E_{s_t ~ d_h^t} l(s_t, h)   error on the model's own prefixes
    AccErr_<=l(h)   = R_<=l(h) / eps_<=l(h)                   ~ l without, up to l^2 with exposure bias
    ExAccErr_<=l(h) = (R_<=l(h) - l eps_<=l(h)) / (l eps_<=l(h)) * 100   [%]

the share of the model's error at length l that is in excess of what it makes on oracle
prefixes. The per-step loss is ``kl``: KL(o(.|s_t) || h(.|s_t)) (the paper's choice), or
``disagreement``: 1 when h's most likely token is not one of o's. The oracle here is the
teacher's next-token distribution, or, in the synthetic task, an exact checker expressed as
a distribution over the valid next tokens (KL then equals -log h(valid token) for one valid
token). Estimator: see ``cumulative_step_loss``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from dcd_megatron.eval.generation import ModelFn, generate

LengthPolicy = Literal["reached", "absorbing"]
StepLoss = Literal["kl", "disagreement"]


def step_kl(oracle_logprobs: torch.Tensor, model_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(oracle || model) over the last (vocabulary) dim; oracle zeros contribute 0 (0 log 0)."""
    p = oracle_logprobs.exp()
    terms = torch.where(p > 0, p * (oracle_logprobs - model_logprobs), torch.zeros_like(p))
    return terms.sum(dim=-1)


def step_disagreement(oracle_logprobs: torch.Tensor, model_logprobs: torch.Tensor) -> torch.Tensor:
    """1.0 where the model's most likely token is not among the oracle's most likely tokens."""
    choice = model_logprobs.argmax(dim=-1, keepdim=True)
    best = oracle_logprobs.max(dim=-1, keepdim=True).values
    return (oracle_logprobs.gather(-1, choice) < best).squeeze(-1).float()


STEP_LOSSES = {"kl": step_kl, "disagreement": step_disagreement}


def _padded(losses: Sequence[Sequence[float] | torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(x) for x in losses], dtype=torch.long)
    width = int(lengths.max()) if len(losses) else 0
    out = torch.zeros(len(losses), width, dtype=torch.float64)
    for i, x in enumerate(losses):
        out[i, : len(x)] = torch.as_tensor(x, dtype=torch.float64)
    return out, lengths


def cumulative_step_loss(
    losses: Sequence[Sequence[float] | torch.Tensor],
    max_len: int | None = None,
    length_policy: LengthPolicy = "reached",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate sum_{t<=l} E[loss_t] for l = 1..max_len from per-sequence step losses.

    ``reached`` (as the authors' code): the mean over the sequences at least l long of their
    summed first l losses; NaN where none is that long. ``absorbing``: a finished sequence
    stays in a terminal state with zero loss, so every sequence counts at every l.
    Returns (curve [max_len], number of sequences counted at each l) in float64.
    """
    padded, lengths = _padded(losses)
    max_len = max_len or padded.shape[1]
    if padded.shape[1] < max_len:
        padded = torch.cat([padded, padded.new_zeros(padded.shape[0], max_len - padded.shape[1])], 1)
    cums = padded[:, :max_len].cumsum(dim=1)
    ls = torch.arange(1, max_len + 1)
    if length_policy == "absorbing":
        counts = torch.full((max_len,), len(losses), dtype=torch.long)
        return cums.mean(dim=0), counts
    if length_policy != "reached":
        raise ValueError(f"length_policy={length_policy!r}; use 'reached' or 'absorbing'")  # internal
    alive = lengths.unsqueeze(1) >= ls.unsqueeze(0)  # [N, L]
    counts = alive.sum(dim=0)
    total = (cums * alive).sum(dim=0)
    curve = torch.where(counts > 0, total / counts.clamp(min=1), torch.full_like(total, math.nan))
    return curve, counts


@dataclass
class ExposureBiasCurve:
    """AccErr and ExAccErr as functions of the length l = 1..L, with their ingredients."""

    length: list[int]
    model_prefix_error: list[float]  # R_<=l(h), accumulated on the model's own prefixes
    oracle_prefix_error: list[float]  # l * eps_<=l(h), accumulated on oracle prefixes
    eps: list[float]  # eps_<=l(h), the mean per-step error on oracle prefixes
    acc_err: list[float]  # AccErr_<=l(h)
    ex_acc_err_pct: list[float]  # ExAccErr_<=l(h) in percent
    n_model: list[int]  # sequences counted at each l
    n_oracle: list[int]

    def at(self, l: int) -> dict[str, float]:
        """The figures at length ``l`` (1-based)."""
        k = l - 1
        return {"acc_err": self.acc_err[k], "ex_acc_err_pct": self.ex_acc_err_pct[k],
                "eps": self.eps[k], "model_prefix_error": self.model_prefix_error[k]}

    def log(self, log_metrics, prefix: str = "exposure_bias") -> None:
        """Log the curve through ``log_metrics(dict, step)`` with step = l (finite values only)."""
        for k, l in enumerate(self.length):
            m = {f"{prefix}/acc_err": self.acc_err[k], f"{prefix}/ex_acc_err_pct": self.ex_acc_err_pct[k],
                 f"{prefix}/eps": self.eps[k]}
            m = {key: v for key, v in m.items() if math.isfinite(v)}
            if m:
                log_metrics(m, l)


def exposure_bias_curve(
    model_prefix_losses: Sequence[Sequence[float] | torch.Tensor],
    oracle_prefix_losses: Sequence[Sequence[float] | torch.Tensor],
    *,
    max_len: int | None = None,
    length_policy: LengthPolicy = "reached",
) -> ExposureBiasCurve:
    """AccErr_<=l and ExAccErr_<=l from per-step losses on model prefixes and on oracle prefixes.

    Each argument holds one loss sequence per rollout (ragged: rollouts end at eos). NaN
    where no rollout reaches l or where eps_<=l is 0 (a model that never errs on oracle
    prefixes has no accumulated-error ratio).
    """
    if not model_prefix_losses or not oracle_prefix_losses:
        raise ValueError("need at least one rollout on model prefixes and one on oracle prefixes")  # internal
    longest = max(max(len(x) for x in model_prefix_losses), max(len(x) for x in oracle_prefix_losses))
    max_len = max_len or longest
    r, n_model = cumulative_step_loss(model_prefix_losses, max_len, length_policy)
    o, n_oracle = cumulative_step_loss(oracle_prefix_losses, max_len, length_policy)
    ls = torch.arange(1, max_len + 1, dtype=torch.float64)
    eps = o / ls
    with torch.no_grad():
        valid = eps > 0
        nan = torch.full_like(eps, math.nan)
        acc = torch.where(valid, r / eps, nan)
        ex = torch.where(valid, (r - ls * eps) / (ls * eps) * 100.0, nan)
    return ExposureBiasCurve(
        length=ls.long().tolist(), model_prefix_error=r.tolist(), oracle_prefix_error=o.tolist(),
        eps=eps.tolist(), acc_err=acc.tolist(), ex_acc_err_pct=ex.tolist(),
        n_model=n_model.tolist(), n_oracle=n_oracle.tolist(),
    )


# --- driver over model / oracle callables -----------------------------------------------------


def _right_padded_batches(seqs: list[list[int]], batch_size: int, pad_id: int):
    """Yield (row indices, tokens [b, t]) batches of ``seqs``, longest first, right-padded."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = len(seqs[idx[0]])
        buf = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for r, i in enumerate(idx):
            buf[r, : len(seqs[i])] = torch.tensor(seqs[i])
        yield idx, buf


def teacher_forced_step_losses(
    model_fn: ModelFn,
    oracle_fn: ModelFn,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    loss: StepLoss = "kl",
    batch_size: int = 8,
    pad_id: int = 0,
    device: str | torch.device = "cpu",
) -> list[torch.Tensor]:
    """Per-step losses l(s_t, h) along each response, s_t = prompt + response[:t].

    Both callables map tokens [b, t] to logits [b, t, V] (causal); right padding is safe.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")  # internal
    step_loss = STEP_LOSSES[loss]
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    out: list[torch.Tensor] = [torch.zeros(0)] * len(seqs)
    with torch.inference_mode():
        for idx, buf in _right_padded_batches(seqs, batch_size, pad_id):
            buf = buf.to(device)
            lm = torch.log_softmax(model_fn(buf).float(), dim=-1)
            lo = torch.log_softmax(oracle_fn(buf).float(), dim=-1)
            for r, i in enumerate(idx):
                p, n = len(prompts[i]), len(responses[i])
                # logits at position p-1+t predict response token t
                out[i] = step_loss(lo[r, p - 1 : p - 1 + n], lm[r, p - 1 : p - 1 + n]).double().cpu()
    return out


def measure_exposure_bias(
    model_fn: ModelFn,
    oracle_fn: ModelFn,
    prompts: Sequence[Sequence[int]],
    *,
    max_len: int,
    eos_id: int | Sequence[int] | None,
    oracle_responses: Sequence[Sequence[int]] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    loss: StepLoss = "kl",
    length_policy: LengthPolicy = "reached",
    batch_size: int = 8,
    seed: int = 0,
    pad_id: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ExposureBiasCurve:
    """ExAccErr of ``model_fn`` against ``oracle_fn`` over lengths 1..``max_len``.

    Model prefixes: the model's own rollouts (``temperature`` 1 samples its distribution d_h;
    0 is greedy). Oracle prefixes: ``oracle_responses`` (e.g. the teacher traces) cut to
    ``max_len``, or, when None, rollouts of the oracle at the same temperature.
    """
    common = dict(max_new_tokens=max_len, eos_id=eos_id, temperature=temperature, top_p=top_p,
                  batch_size=batch_size, seed=seed, progress=progress, device=device, pad_id=pad_id)
    own = [s[0] for s in generate(model_fn, prompts, **common)]
    if oracle_responses is None:
        ref = [s[0] for s in generate(oracle_fn, prompts, **common)]
    else:
        ref = [list(r)[:max_len] for r in oracle_responses]
    kw = dict(loss=loss, batch_size=batch_size, pad_id=pad_id, device=device)
    model_losses = teacher_forced_step_losses(model_fn, oracle_fn, prompts, own, **kw)
    oracle_losses = teacher_forced_step_losses(model_fn, oracle_fn, prompts, ref, **kw)
    keep_m = [x for x in model_losses if len(x)]
    keep_o = [x for x in oracle_losses if len(x)]
    return exposure_bias_curve(keep_m, keep_o, max_len=max_len, length_policy=length_policy)
