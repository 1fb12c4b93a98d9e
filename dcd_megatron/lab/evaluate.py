"""What the lab measures on a student: greedy accuracy by length and style, ExAccErr, weights by style.

Models are `KVCachedGPT`s (callable for full forwards, incremental for decoding); `tok` is the
project tokenizer of the task. Results are plain dicts of numbers (JSON- and MLflow-ready).
"""

from __future__ import annotations

import math

import torch

from dcd_megatron.eval.exposure_bias import measure_exposure_bias
from dcd_megatron.eval.generation import generate, strip_eos
from dcd_megatron.lab import task
from dcd_megatron.lab.config import trace_tokens
from dcd_megatron.loss import DCDConfig, dcd_weights

BRANCH_POSITION = 3  # response[3] is "=" (verbose) or "+" (skip styles): the style-choosing token


def prompt_ids(tok, digits: str) -> list[int]:
    """BOS + the prompt, exactly as the trainer encodes it (plain template, add_bos)."""
    return [tok.bos_id, *tok.encode(task.make_prompt(digits))]


def greedy_accuracy(model, tok, problems: dict[int, list[str]], *, batch_size: int) -> dict[str, dict]:
    """Per k: problems, correct answers, and the style the greedy trace was written in."""
    out = {}
    for k, digits in sorted(problems.items()):
        prompts = [prompt_ids(tok, d) for d in digits]
        max_new = trace_tokens(k) - len(prompts[0]) + 4
        gens = generate(model, prompts, max_new_tokens=max_new, eos_id=tok.eos_id, temperature=0.0,
                        batch_size=batch_size, progress=False)
        out[str(k)] = task.accuracy_record(digits, [tok.decode(strip_eos(g[0], tok.eos_id)) for g in gens])
    return out


def exposure_bias(student, teacher, tok, digits: list[str], *, max_len: int, seed: int, batch_size: int) -> dict:
    """ExAccErr and AccErr at length `max_len` with the teacher as the oracle (per-step KL).

    The student's prefixes are its own samples at temperature 1, the oracle's are the
    teacher's samples at temperature 1; a finished sequence adds no further loss (absorbing).
    """
    prompts = [prompt_ids(tok, d) for d in digits]
    curve = measure_exposure_bias(
        student, teacher, prompts, max_len=max_len, eos_id=tok.eos_id, temperature=1.0, loss="kl",
        length_policy="absorbing", batch_size=batch_size, seed=seed,
    )
    at = curve.at(max_len)
    return {"ex_acc_err_pct": at["ex_acc_err_pct"], "acc_err": at["acc_err"], "eps": at["eps"],
            "model_prefix_error": at["model_prefix_error"], "max_len": max_len, "prompts": len(prompts)}


def token_batch(tok, rows: list[dict]):
    """Right-padded ids [b, t] of BOS+prompt+response+EOS, the teacher log-probs aligned to the
    predicted token (t predicts ids[t+1]), a mask of response+EOS targets, and branch positions."""
    seqs, teacher, starts = [], [], []
    for row in rows:
        p = prompt_ids(tok, digits_of_row(row))
        r = tok.encode(row["response"])
        seqs.append(p + r + [tok.eos_id])
        teacher.append(list(row["teacher_logprobs"]))
        starts.append(len(p))
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    a = torch.zeros(len(rows), width - 1)
    mask = torch.zeros(len(rows), width - 1)
    branch = torch.full((len(rows),), -1, dtype=torch.long)
    for i, (s, lp, start) in enumerate(zip(seqs, teacher, starts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        n = len(s) - start  # response tokens + EOS, all trained
        a[i, start - 1 : start - 1 + n] = torch.tensor(lp[:n], dtype=torch.float32)
        mask[i, start - 1 : start - 1 + n] = 1.0
        if n > BRANCH_POSITION + 1:
            branch[i] = start - 1 + BRANCH_POSITION
    return ids, a, mask, branch


def topk_batch(rows: list[dict], mask: torch.Tensor) -> torch.Tensor:
    """The rows' teacher top-k log-probs aligned like `token_batch`'s teacher log-probs: [b, t-1, k]
    (NaN off the response)."""
    k = len(rows[0]["teacher_topk_logprobs"][0])
    out = torch.full((*mask.shape, k), math.nan)
    for i, row in enumerate(rows):
        cols = mask[i].nonzero().squeeze(-1)
        out[i, cols] = torch.tensor(row["teacher_topk_logprobs"][: len(cols)], dtype=torch.float32)
    return out


def digits_of_row(row: dict) -> str:
    return row["prompt"].rstrip(":")


def student_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) under `model`, shape [b, t-1]."""
    logp = torch.log_softmax(model(ids)[:, :-1].float(), dim=-1)
    return logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def weights_by_style(model, tok, rows: list[dict], loss: DCDConfig, *, step: int, reference=None) -> dict[str, dict]:
    """Mean DCD weight per trace style, relative to the mean over all sampled tokens (so 1 = average).

    `reference` is the frozen initial student (the prior) whose log-probs loss.reference=initial reads.

    `mean`: over all response tokens of that style; `branch`: at the style-choosing token; also
    the mean log-ratio l = s - a there. Computed with `dcd_weights` on a fixed sample of training
    traces, one row per document (so `sequence` weights are per trace, before batch normalisation).
    """
    if not rows:
        return {}
    ids, a, mask, branch = token_batch(tok, rows)
    topk = topk_batch(rows, mask) if loss.entropy_gate else None
    with torch.no_grad():
        s = student_logprobs(model, ids)
        ref = student_logprobs(reference, ids) if loss.needs_reference else None
        w = dcd_weights(s, a if loss.needs_teacher else None, mask, loss, step=step, teacher_topk_logprobs=topk,
                        reference_logprobs=ref)
        if ref is not None:
            s = ref  # the log-ratio the weights saw
    valid = mask > 0
    overall = float(w[valid].mean())
    scale = 1.0 / overall if overall > 0 else math.nan
    l = (s - a) * mask
    out = {}
    for style in sorted({r["style"] for r in rows}):
        sel = torch.tensor([r["style"] == style for r in rows])
        m = valid & sel.unsqueeze(1)
        has_branch = sel & (branch >= 0)
        b_idx = branch[has_branch]
        rows_b = has_branch.nonzero().squeeze(-1)
        out[style] = {
            "traces": int(sel.sum()),
            "mean": float(w[m].mean()) * scale,
            "branch": float(w[rows_b, b_idx].mean()) * scale if len(b_idx) else math.nan,
            "log_ratio_branch": float(l[rows_b, b_idx].mean()) if len(b_idx) else math.nan,
            "log_ratio_mean": float(l[m].mean()),
        }
    return out
