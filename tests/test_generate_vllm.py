"""The vLLM adapter of dcd-generate on recorded output structures (vLLM cannot run on these CPU machines):
settings set explicitly, versions refused, outputs read back as our traces, the rescoring gap."""

import math
from types import SimpleNamespace as NS

import pytest

from dcd_megatron.data.config import DataConfig
from dcd_megatron.generate import GenerateConfig, GenerateError
from dcd_megatron.generate import vllm_backend as vb


def _cfg(**kw):
    base = dict(teacher="t", prompts="p.jsonl", out_dir="o", data=DataConfig(tokenizer="tok.json"), n=2,
                temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=16, logprob_top_k=2, seed=3)
    return GenerateConfig(**{**base, **kw})


@pytest.mark.parametrize("version, ok", [("0.10.2", True), ("0.11.0+cu128", True), ("1.0.0rc1", True),
                                         ("0.10.1", False), ("0.9.2", False), ("dev", False)])
def test_old_or_unreadable_vllm_versions_are_refused(version, ok):
    if ok:
        vb.check_version(version)
    else:
        with pytest.raises(GenerateError, match="vllm>=0.10.2|cannot read"):
            vb.check_version(version)


def test_every_field_that_shapes_the_distribution_is_set():
    kw = vb.sampling_kwargs(_cfg(), stop_ids={5, 2}, seed=11)
    assert kw["top_k"] == -1 and vb.sampling_kwargs(_cfg(top_k=4), stop_ids=[2], seed=1)["top_k"] == 4
    assert (kw["temperature"], kw["top_p"], kw["n"], kw["max_tokens"], kw["seed"]) == (0.7, 0.9, 2, 16, 11)
    assert (kw["min_p"], kw["min_tokens"], kw["presence_penalty"], kw["frequency_penalty"]) == (0.0, 0, 0.0, 0.0)
    assert kw["repetition_penalty"] == 1.0 and kw["logit_bias"] is None and kw["stop"] is None
    assert kw["stop_token_ids"] == [2, 5] and kw["logprobs"] == 2 and kw["detokenize"] is False
    engine = vb.engine_kwargs("/hf", _cfg(), max_model_len=64)
    assert engine["logprobs_mode"] == "processed_logprobs" and engine["skip_tokenizer_init"] is True


def test_request_seeds_are_per_prompt_and_reproducible():
    seeds = [vb.request_seed(3, i) for i in range(50)]
    assert len(set(seeds)) == 50 and seeds == [vb.request_seed(3, i) for i in range(50)]
    assert all(0 <= s < 2 ** 63 for s in seeds) and vb.request_seed(4, 0) != seeds[0]


def _lp(logprob, rank):
    return NS(logprob=logprob, rank=rank, decoded_token=None)


# the structure vLLM's LLM.generate returns: RequestOutput(outputs=[CompletionOutput(index, token_ids,
# logprobs=[{token id: Logprob(logprob, rank, decoded_token)} per position], finish_reason, stop_reason)])
RECORDED = [
    NS(request_id="0", prompt_token_ids=[1, 7], outputs=[
        NS(index=1, token_ids=[4, 2], finish_reason="stop", stop_reason=None,
           logprobs=[{4: _lp(-0.1, 1), 9: _lp(-2.4, 2)}, {2: _lp(-0.5, 2), 6: _lp(-1.0, 1)}]),
        NS(index=0, token_ids=[9, 8], finish_reason="length", stop_reason=None,
           logprobs=[{9: _lp(-2.4, 2), 4: _lp(-0.1, 1)}, {8: _lp(-3.0, 5), 3: _lp(-0.2, 1), 6: _lp(-1.9, 2)}]),
    ]),
]


def test_outputs_become_traces_by_sample_index_with_top_k_by_rank():
    [[first, second]] = vb.traces_from_outputs(RECORDED, n=2, logprob_top_k=2)
    assert first.tokens == [9, 8] and first.logprobs == [-2.4, -3.0]
    assert first.top_ids == [[4, 9], [3, 6]] and first.top_logprobs == [[-0.1, -2.4], [-0.2, -1.9]]
    assert second.tokens == [4, 2] and second.logprobs == [-0.1, -0.5] and second.top_ids == [[4, 9], [6, 2]]


def test_a_stop_token_left_out_of_the_ids_is_refused():
    bad = [NS(outputs=[NS(index=0, token_ids=[4], finish_reason="stop", stop_reason=5, logprobs=[{4: _lp(-0.1, 1)}])])]
    with pytest.raises(GenerateError, match="left the stop token 5 out"):
        vb.traces_from_outputs(bad, n=1, logprob_top_k=1)


def test_the_rescoring_gap():
    assert vb.logprob_gap([-0.1, -2.0], [-0.1, -2.5]) == pytest.approx((0.25, 0.5))
    assert vb.logprob_gap([-math.inf], [-math.inf]) == (0.0, 0.0)
    assert vb.logprob_gap([-0.1], [-math.inf])[1] == math.inf
