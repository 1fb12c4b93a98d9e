"""Generation with fake deterministic causal models: greedy, seeded sampling, top-p, eos, batching."""

import math

import pytest
import torch

from dcd_megatron.eval.generation import RecomputeDecoder, generate, next_tokens, strip_eos

V, P, EOS = 11, 101, 10


def _table(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(P, V, generator=g) * 2.0


class HashLM:
    """Causal: the logits at t depend on tokens 0..t through a running hash h_t = 31 h_{t-1} + x_t."""

    def __init__(self, table, eos_bias=0.0):
        self.table = table.clone()
        self.table[:, EOS] += eos_bias

    def __call__(self, tokens):
        b, t = tokens.shape
        h = torch.zeros(b, dtype=torch.long)
        out = []
        for k in range(t):
            h = (h * 31 + tokens[:, k]) % P
            out.append(self.table[h])
        return torch.stack(out, dim=1)


class HashDecoder:
    """The same model as a KV-cache-like incremental decoder: the state is the running hash."""

    def __init__(self, lm):
        self.lm = lm

    def prefill(self, prompts):
        h = torch.zeros(len(prompts), dtype=torch.long)
        for i, p in enumerate(prompts):
            for x in p.tolist():
                h[i] = (h[i] * 31 + x) % P
        return self.lm.table[h], h

    def step(self, h, tokens):
        h = (h * 31 + tokens) % P
        return self.lm.table[h], h

    def select(self, h, rows):
        return h[rows]


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 1], [2, 2], [3, 1, 4, 1, 5], [9]]


def test_greedy_picks_the_argmax_of_the_full_prefix():
    lm = HashLM(_table())
    out = generate(lm, PROMPTS, max_new_tokens=6, eos_id=None, progress=False)
    for prompt, (gen,) in zip(PROMPTS, out, strict=True):
        assert len(gen) == 6
        seq = list(prompt)
        for tok in gen:
            expected = int(lm(torch.tensor([seq]))[0, -1].argmax())
            assert tok == expected
            seq.append(tok)


def test_batching_mixed_prompt_lengths_equals_one_at_a_time():
    lm = HashLM(_table(1), eos_bias=1.5)
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.9, "n": 3, "seed": 7}):
        batched = generate(lm, PROMPTS, max_new_tokens=8, eos_id=EOS, batch_size=4, progress=False, **kw)
        alone = generate(lm, PROMPTS, max_new_tokens=8, eos_id=EOS, batch_size=1, progress=False, **kw)
        assert batched == alone
        assert any(s[-1] == EOS for per in batched for s in per)  # some rows stopped early
        assert len({len(s) for per in batched for s in per}) > 1


def test_incremental_decoder_hook_matches_full_recompute():
    lm = HashLM(_table(2), eos_bias=1.0)
    for kw in ({"temperature": 0.0}, {"temperature": 0.8, "n": 2, "seed": 3}):
        full = generate(lm, PROMPTS, max_new_tokens=10, eos_id=EOS, batch_size=3, progress=False, **kw)
        cached = generate(HashDecoder(lm), PROMPTS, max_new_tokens=10, eos_id=EOS, batch_size=3, progress=False, **kw)
        assert full == cached


def test_sampling_is_seeded_and_reproducible():
    lm = HashLM(_table(3))
    run = lambda seed: generate(lm, PROMPTS, max_new_tokens=12, eos_id=None, temperature=1.0, n=2, seed=seed,
                                batch_size=5, progress=False)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a != c
    assert any(per[0] != per[1] for per in a)  # the n samples of a prompt differ


class FixedLM:
    """The same next-token distribution [0.5, 0.3, 0.15, 0.05] at every position."""

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])

    def __call__(self, tokens):
        return self.probs.log().expand(*tokens.shape, 4).clone()


@pytest.mark.parametrize("top_p, allowed", [(0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3}), (0.2, {0})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, allowed):
    out = generate(FixedLM(), [[0]], max_new_tokens=1, eos_id=None, temperature=1.0, top_p=top_p, n=300,
                   batch_size=300, progress=False)
    assert {s[0] for s in out[0]} == allowed


def test_inverse_cdf_matches_the_truncated_renormalised_distribution():
    m = 2000
    logits = FixedLM.probs.log().expand(m, 4)
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m  # an even grid over [0, 1)
    for temperature, top_p in [(1.0, 0.7), (1.0, 1.0), (0.5, 1.0), (2.0, 0.9)]:
        p = FixedLM.probs.double() ** (1 / temperature)
        p = p / p.sum()
        keep = (p.cumsum(0) - p) < top_p
        q = p * keep / (p * keep).sum()
        tok = next_tokens(logits, temperature=temperature, top_p=top_p, uniforms=u)
        freq = torch.bincount(tok, minlength=4).double() / m
        assert torch.allclose(freq, q, atol=2 / m), (temperature, top_p, freq, q)


class CountdownLM:
    """Emits token 3 until the sequence holds (first token) new tokens, then eos (4); vocab 5."""

    def __call__(self, tokens):
        b, t = tokens.shape
        logits = torch.zeros(b, t, 5)
        pos = torch.arange(t).expand(b, t)
        stop = pos >= tokens[:, :1]  # prompt is one token k at position 0: stop after k tokens
        logits[..., 3] = (~stop).float() * 5
        logits[..., 4] = stop.float() * 5
        return logits


def test_eos_stops_each_row_and_is_kept():
    out = generate(CountdownLM(), [[2], [0], [3], [1]], max_new_tokens=3, eos_id=4, batch_size=4, progress=False)
    gens = [per[0] for per in out]
    assert gens[0] == [3, 3, 4]
    assert gens[1] == [4]
    assert gens[2] == [3, 3, 3]  # cut at max_new_tokens, no eos
    assert gens[3] == [3, 4]
    assert strip_eos(gens[0], 4) == [3, 3]
    assert strip_eos(gens[2], [4, 9]) == [3, 3, 3]


def test_argument_errors():
    lm = HashLM(_table())
    with pytest.raises(ValueError, match="temperature 0"):
        generate(lm, [[1]], max_new_tokens=2, eos_id=None, n=2, progress=False)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(lm, [[1], []], max_new_tokens=2, eos_id=None, progress=False)
    with pytest.raises(ValueError, match="top_p"):
        generate(lm, [[1]], max_new_tokens=2, eos_id=None, temperature=1.0, top_p=0.0, progress=False)
    with pytest.raises(ValueError, match=r"\[batch, seq, vocab\]"):
        generate(lambda x: x.float(), [[1]], max_new_tokens=2, eos_id=None, progress=False)


def test_recompute_decoder_select_keeps_rows_in_order():
    dec = RecomputeDecoder(HashLM(_table()))
    logits, state = dec.prefill([torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])])
    state = dec.select(state, torch.tensor([2, 1]))
    buf, lengths = state
    assert lengths.tolist() == [2, 1]
    assert buf[0, :2].tolist() == [5, 6] and buf[1, 0].item() == 4
    assert not math.isnan(float(logits.sum()))
