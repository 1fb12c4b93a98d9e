"""Batched autoregressive generation (greedy, or sampled with temperature / top-p / n) for any causal LM.

The model is one of two things:

* a ``ModelFn``: ``model_fn(tokens: LongTensor[b, t]) -> logits[b, t, V]``, the whole causal
  LM recomputed every step. Rows of different lengths share a batch by *right* padding: row i
  holds its own tokens at positions ``0 .. len_i - 1`` (position ids and the default causal
  mask are the natural ones) and its next token is read from ``logits[i, len_i - 1]``. Because
  the model is causal, whatever stands after a row's last real token never reaches that row's
  logits, so no attention mask is needed and a batch gives exactly what one row alone gives.
* an ``IncrementalDecoder`` (``prefill`` / ``step`` / ``select``): a KV-cached decoder that
  keeps its own per-row state; ``RecomputeDecoder`` wraps a ``ModelFn`` into one.

Sampling is reproducible and independent of batching: row (prompt i, sample j) draws one
uniform per step from its own stream seeded by ``(seed, i, j)`` and picks the token by the
inverse CDF of its (temperature-scaled, top-k then top-p truncated) distribution
(`sampling.rule`). ``sample`` also returns, per token, its log-prob under that distribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from dcd_megatron.sampling.rule import sample_step

ModelFn = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class IncrementalDecoder(Protocol):
    """A decoder that keeps per-row state between steps (e.g. a KV cache)."""

    def prefill(self, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Run the prompts (1-D LongTensors, any lengths); return next-token logits [b, V] and state."""

    def step(self, state: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Append one token per row (LongTensor [b]); return next-token logits [b, V] and state."""

    def select(self, state: Any, rows: torch.Tensor) -> Any:
        """Keep only ``rows`` (LongTensor of row indices, in that order) of the state."""


class RecomputeDecoder:
    """An ``IncrementalDecoder`` over a plain ``ModelFn`` that recomputes the whole prefix each step.

    Costs O(t) forward tokens a step (O(T^2) a sequence) and materialises ``[b, t, V]`` logits:
    right for tests and small models; a real model should plug in a KV-cached decoder.
    """

    def __init__(self, model_fn: ModelFn, pad_id: int = 0):
        self.model_fn = model_fn
        self.pad_id = pad_id

    def _next_logits(self, buf: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        logits = self.model_fn(buf)
        if logits.dim() != 3 or logits.shape[:2] != buf.shape:
            raise ValueError(  # internal
                f"model_fn returned logits of shape {tuple(logits.shape)} for tokens of shape "
                f"{tuple(buf.shape)}; expected [batch, seq, vocab]"
            )
        return logits[torch.arange(buf.shape[0], device=buf.device), lengths - 1]

    def prefill(self, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        lengths = torch.tensor([len(p) for p in prompts], device=prompts[0].device)
        buf = torch.full((len(prompts), int(lengths.max())), self.pad_id, dtype=torch.long,
                         device=prompts[0].device)
        for i, p in enumerate(prompts):
            buf[i, : len(p)] = p
        return self._next_logits(buf, lengths), (buf, lengths)

    def step(self, state: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        buf, lengths = state
        width = int(lengths.max()) + 1
        if width > buf.shape[1]:
            buf = torch.cat([buf, torch.full_like(buf[:, :1], self.pad_id)], dim=1)
        buf = buf.clone()
        buf[torch.arange(buf.shape[0], device=buf.device), lengths] = tokens
        lengths = lengths + 1
        buf = buf[:, : int(lengths.max())]
        return self._next_logits(buf, lengths), (buf, lengths)

    def select(self, state: Any, rows: torch.Tensor) -> Any:
        buf, lengths = state
        lengths = lengths[rows]
        return buf[rows][:, : int(lengths.max())], lengths


def _row_uniforms(seed: int, prompt_idx: int, sample_idx: int, steps: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, prompt_idx, sample_idx])).random(steps)


@dataclass
class Trace:
    """One sampled continuation: its tokens and, when sampled (T > 0), each token's log-prob under the
    kept renormalised distribution it was drawn from, and that distribution's top-K per token."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)


def _check(prompts, *, max_new_tokens, temperature, top_p, top_k, n, batch_size) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")  # internal
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")  # internal
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")  # internal
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = no top-k)")  # internal
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")  # internal
    if temperature == 0.0 and n > 1:
        raise ValueError(f"n={n} with temperature 0 repeats one greedy output; use n=1 or temperature > 0")  # internal
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")  # internal
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")  # internal


def _eos_set(eos_id: int | Sequence[int] | None) -> set[int]:
    return set() if eos_id is None else ({int(eos_id)} if isinstance(eos_id, int) else set(map(int, eos_id)))


def _decode_batch(decoder, prompts, batch, *, max_new_tokens, eos_tensor, seed, keys, device, logprob_top_k,
                  **rule) -> list[Trace]:
    """Decode one batch of (prompt, sample) rows to their traces (``keys[i]``: prompt i's stream)."""
    uniforms = None
    if rule["temperature"] > 0:
        uniforms = torch.from_numpy(
            np.stack([_row_uniforms(seed, keys[i], j, max_new_tokens) for i, j in batch])
        ).to(device)
    traces = [Trace() for _ in batch]
    tensors = [torch.as_tensor(list(prompts[i]), dtype=torch.long, device=device) for i, _ in batch]
    logits, state = decoder.prefill(tensors)
    active = torch.arange(len(batch), device=device)
    for t in range(max_new_tokens):
        u = None if uniforms is None else uniforms[active, t]
        got = sample_step(logits, uniforms=u, logprob_top_k=logprob_top_k, **rule)
        tok = got.tokens
        _record(traces, active.tolist(), got)
        done = torch.isin(tok, eos_tensor) if eos_tensor.numel() else torch.zeros_like(tok, dtype=torch.bool)
        if t == max_new_tokens - 1:
            break
        if done.any():
            keep = (~done).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            active, tok = active[keep], tok[keep]
            state = decoder.select(state, keep)
        logits, state = decoder.step(state, tok)
    return traces


def _record(traces: list[Trace], rows: list[int], got) -> None:
    """Append one step's sample to the traces of ``rows`` (one host copy a step, not one a row)."""
    columns = [got.tokens.tolist()]
    if got.logprobs is not None:
        columns.append(got.logprobs.tolist())
        if got.top_ids is not None:
            columns += [got.top_ids.tolist(), got.top_logprobs.tolist()]
    for r, values in zip(rows, zip(*columns, strict=True), strict=True):
        trace = traces[r]
        trace.tokens.append(values[0])
        if len(values) > 1:
            trace.logprobs.append(values[1])
        if len(values) > 2:
            trace.top_ids.append(values[2])
            trace.top_logprobs.append(values[3])


def sample(
    model_fn: ModelFn | IncrementalDecoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    n: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    logprob_top_k: int = 0,
    prompt_keys: Sequence[int] | None = None,
    progress: bool = True,
    device: str | torch.device = "cpu",
    pad_id: int = 0,
) -> list[list[Trace]]:
    """Continue each prompt ``n`` times; returns ``out[prompt][sample]``, a `Trace`.

    Each continuation stops after its first eos token (kept, so a caller can tell a finished
    answer from one cut at ``max_new_tokens``) or at ``max_new_tokens``. Greedy
    (``temperature=0``) is deterministic; sampling is reproducible for a ``seed`` and does not
    depend on ``batch_size`` or on the order of rows. Rows are batched longest prompt first
    and a finished row leaves its batch. ``prompt_keys[i]`` names prompt i's random streams
    (default: i), so a prompt samples alike wherever a caller's shard puts it.
    """
    _check(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, n=n,
           batch_size=batch_size)
    decoder = model_fn if isinstance(model_fn, IncrementalDecoder) else RecomputeDecoder(model_fn, pad_id)
    keys = list(range(len(prompts))) if prompt_keys is None else [int(k) for k in prompt_keys]
    if len(keys) != len(prompts):
        raise ValueError(f"{len(keys)} prompt_keys for {len(prompts)} prompts")  # internal
    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
    rows.sort(key=lambda r: -len(prompts[r[0]]))  # stable: ties keep (i, j) order
    out: list[list[Trace]] = [[Trace() for _ in range(n)] for _ in prompts]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), disable=not progress, desc="generate", unit="seq", dynamic_ncols=True)
    eos_tensor = torch.tensor(sorted(_eos_set(eos_id)), dtype=torch.long, device=device)
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            traces = _decode_batch(decoder, prompts, batch, max_new_tokens=max_new_tokens, eos_tensor=eos_tensor,
                                   seed=seed, keys=keys, device=device, logprob_top_k=logprob_top_k,
                                   temperature=temperature, top_p=top_p, top_k=top_k)
            for (i, j), trace in zip(batch, traces, strict=True):
                out[i][j] = trace
            bar.update(len(batch))
    bar.close()
    return out


def generate(model_fn: ModelFn | IncrementalDecoder, prompts: Sequence[Sequence[int]], **kw) -> list[list[list[int]]]:
    """`sample`'s tokens only: ``out[prompt][sample] = new token ids`` (what `dcd-eval` keeps)."""
    return [[trace.tokens for trace in row] for row in sample(model_fn, prompts, **kw)]


def strip_eos(tokens: Sequence[int], eos_id: int | Sequence[int] | None) -> list[int]:
    """The tokens before the first eos (for decoding to text)."""
    eos = _eos_set(eos_id)
    for k, tok in enumerate(tokens):
        if tok in eos:
            return list(tokens[:k])
    return list(tokens)
