"""Sample teacher traces with the per-token log-probs of the distribution they were drawn from."""

from __future__ import annotations

from collections import defaultdict

import torch


@torch.no_grad()
def sample_with_logprobs(
    logits_fn,
    prompts: list[list[int]],
    *,
    eos_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[tuple[list[int], list[float]]]:
    """For each prompt: (sampled ids incl. eos when reached, log-prob of each sampled id).

    The log-probs are under the sampling distribution itself (logits / temperature), which is
    what the DCD ratio needs. `logits_fn(tokens [b, t]) -> [b, t, V]`. Prompts are batched by
    length, so no padding enters the model.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling (use greedy decoding elsewhere)")
    gen = torch.Generator().manual_seed(seed)
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out: list[tuple[list[int], list[float]] | None] = [None] * len(prompts)
    for length in sorted(by_len):
        idx = by_len[length]
        for start in range(0, len(idx), batch_size):
            rows = idx[start : start + batch_size]
            tokens = torch.tensor([prompts[i] for i in rows], dtype=torch.long)
            ids = [[] for _ in rows]
            lps = [[] for _ in rows]
            alive = torch.ones(len(rows), dtype=torch.bool)
            for _ in range(max_new_tokens):
                logits = logits_fn(tokens)[:, -1].float() / temperature
                logp = torch.log_softmax(logits, dim=-1)
                nxt = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
                for j in range(len(rows)):
                    if alive[j]:
                        ids[j].append(int(nxt[j]))
                        lps[j].append(float(logp[j, nxt[j]]))
                alive &= nxt != eos_id
                if not alive.any():
                    break
                tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
            for j, i in enumerate(rows):
                out[i] = (ids[j], lps[j])
    return out  # type: ignore[return-value]


@torch.no_grad()
def sample_and_score(
    model,
    prompts: list[list[int]],
    *,
    eos_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    topk: int = 0,
) -> list[tuple]:
    """Like `sample_with_logprobs`, for a KV-cached decoder that is also a full `ModelFn`.

    Samples with `eval.generation.generate` (reproducible per prompt, independent of batching),
    then scores every finished sample in one teacher-forced forward: the log-probs are those of
    the sampling distribution itself (logits / temperature), as the DCD ratio needs. With
    `topk > 0` each result also has the `topk` most likely ids and their log-probs per token.
    """
    from dcd_megatron.eval.generation import generate

    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling (use greedy decoding elsewhere)")
    gens = generate(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=temperature,
                    seed=seed, batch_size=batch_size, progress=False)
    samples = [g[0] for g in gens]
    out: list[tuple[list[int], list[float]] | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(samples[i])))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) + len(samples[i]) for i in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            seq = list(prompts[i]) + samples[i]
            tokens[r, : len(seq)] = torch.tensor(seq)
        logp = torch.log_softmax(model(tokens).float() / temperature, dim=-1)
        for r, i in enumerate(rows):
            p, n = len(prompts[i]), len(samples[i])
            rows_logp = logp[r, p - 1 : p - 1 + n]
            picked = rows_logp.gather(-1, tokens[r, p : p + n].unsqueeze(-1)).squeeze(-1)
            out[i] = (samples[i], picked.tolist())
            if topk > 0:
                top = rows_logp.topk(topk, dim=-1)
                out[i] += (top.indices.tolist(), top.values.tolist())
    return out  # type: ignore[return-value]
