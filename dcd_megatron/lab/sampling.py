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
