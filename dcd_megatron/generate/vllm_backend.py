"""The vLLM adapter of dcd-generate (GPU users): engine and sampling settings set explicitly, and vLLM's
outputs read back into our `Trace`s. Not wired to `--backend vllm` yet (see docs/generation.md).

What it guarantees: log-probs of the sampling distribution (`logprobs_mode="processed_logprobs"`,
after temperature, top-k and top-p, renormalised; refused on vLLM releases older than `MIN_VLLM`,
whose processed log-probs leave the temperature out), prompts passed as token ids (vLLM's tokenizer
is never used: `skip_tokenizer_init`), sampled ids read as ids (never vLLM's text), every sampling
field set and recorded, nothing else shaping the distribution (no penalties, min_p, min_tokens,
logit bias or stop strings). `logprob_gap` compares each row with our own rescoring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dcd_megatron.generate.config import GenerateConfig, GenerateError
from dcd_megatron.sampling.generation import Trace

MIN_VLLM = (0, 10, 2)  # the first release whose processed log-probs include the temperature


def check_version(version: str) -> None:
    """Refuse a vLLM release older than `MIN_VLLM` (or one whose version cannot be read)."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece else ""
        if not digits:
            break
        parts.append(int(digits))
    if len(parts) < 2:
        raise GenerateError(f"cannot read the vLLM version {version!r}; install vllm>={'.'.join(map(str, MIN_VLLM))}")
    if tuple(parts + [0] * (3 - len(parts))) < MIN_VLLM:
        raise GenerateError(
            f"vLLM {version} returns processed log-probs without the temperature; install "
            f"vllm>={'.'.join(map(str, MIN_VLLM))} (pip install '.[vllm]') or use --backend megatron"
        )


def engine_kwargs(hf_dir: str, cfg: GenerateConfig, *, max_model_len: int) -> dict:
    """`vllm.LLM(**kw)`: the teacher as a Hugging Face directory (`dcd-convert mcore-to-hf` output), log-probs
    of the processed (sampling) distribution, and no tokenizer of vLLM's (token ids in and out)."""
    return dict(model=str(hf_dir), skip_tokenizer_init=True, logprobs_mode="processed_logprobs",
                max_logprobs=max(1, cfg.logprob_top_k), max_model_len=max_model_len, seed=cfg.seed,
                enable_prefix_caching=True)


def sampling_kwargs(cfg: GenerateConfig, *, stop_ids: Sequence[int], seed: int) -> dict:
    """`vllm.SamplingParams(**kw)` for one prompt: every field that shapes the distribution set explicitly
    (vLLM's top_k "off" is -1; ours is 0). `seed`: this prompt's (see `request_seed`)."""
    return dict(
        n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or -1, min_p=0.0, seed=seed,
        max_tokens=cfg.max_new_tokens, min_tokens=0, presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=1.0, logit_bias=None, stop=None, stop_token_ids=sorted(stop_ids), ignore_eos=False,
        include_stop_str_in_output=False, logprobs=max(1, cfg.logprob_top_k), detokenize=False,
        skip_special_tokens=False,
    )


def request_seed(seed: int, prompt_index: int) -> int:
    """One 63-bit seed per (run seed, prompt): a prompt samples alike in any shard or engine."""
    import numpy as np

    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def _position(entry: dict, token: int, k: int) -> tuple[float, list[int], list[float]]:
    """(the sampled token's log-prob, top-k ids, top-k log-probs) of one position's {id: Logprob}."""
    if token not in entry:
        raise GenerateError(f"vLLM returned no log-prob for the sampled token {token}; use --backend megatron")
    ranked = sorted(((v.rank, i, v.logprob) for i, v in entry.items() if v.rank is not None and v.rank >= 1))
    top = [(i, lp) for _, i, lp in ranked[:k]]
    return float(entry[token].logprob), [i for i, _ in top], [float(lp) for _, lp in top]


def traces_from_outputs(outputs: Sequence, n: int, logprob_top_k: int) -> list[list[Trace]]:
    """`out[prompt][sample]` from vLLM's `RequestOutput`s (one per prompt, in prompt order; samples by
    `CompletionOutput.index`). An end token vLLM stopped on is appended (vLLM leaves stop ids out of
    `token_ids` unless they are eos), so a trace ends as ours do."""
    result = []
    for request in outputs:
        row = [Trace() for _ in range(n)]
        for completion in request.outputs:
            ids = list(completion.token_ids)
            if completion.finish_reason == "stop" and isinstance(completion.stop_reason, int) and (
                    not ids or ids[-1] != completion.stop_reason):
                raise GenerateError(f"vLLM left the stop token {completion.stop_reason} out of token_ids (and its "
                                    "log-prob): this vLLM release does not fit the adapter; use --backend megatron")
            trace = row[completion.index]
            for token, entry in zip(ids, completion.logprobs, strict=True):
                lp, top_ids, top_lps = _position(entry, token, logprob_top_k)
                trace.tokens.append(int(token))
                trace.logprobs.append(lp)
                if logprob_top_k:
                    trace.top_ids.append(top_ids)
                    trace.top_logprobs.append(top_lps)
        result.append(row)
    return result


def logprob_gap(stored: Sequence[float], rescored: Sequence[float]) -> tuple[float, float]:
    """(mean, max) |stored - rescored| over a row's tokens; inf when one side dropped a token the other kept."""
    if len(stored) != len(rescored):
        raise ValueError(f"{len(stored)} stored and {len(rescored)} rescored log-probs")  # internal
    gaps = []
    for a, b in zip(stored, rescored, strict=True):
        if math.isinf(a) or math.isinf(b):
            gaps.append(0.0 if a == b else math.inf)
        else:
            gaps.append(abs(a - b))
    return (sum(gaps) / len(gaps), max(gaps)) if gaps else (0.0, 0.0)
