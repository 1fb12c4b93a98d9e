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


def _generate_on_two_ranks(rank, world_size, setup, out, out_one_shard):
    from dcd_megatron.generate import generate_traces

    three = generate_traces(_cfg(setup, out), progress=False).shards_generated
    # one shard: rank 1 has no work, yet must take part in loading the teacher (a collective)
    one = generate_traces(_cfg(setup, out_one_shard, prompts_per_shard=len(QUESTIONS)), progress=False)
    return three, one.shards_generated


def test_two_dp_ranks_write_what_one_writes(setup, tmp_path):
    from tests.dist import run_ranks

    shared = {k: setup[k] for k in ("tok", "teacher", "prompts")}
    got = run_ranks(_generate_on_two_ranks, 2, shared, str(tmp_path / "dp2"), str(tmp_path / "one"), timeout=300)
    assert got == [(2, 1), (1, 0)]  # 3 shards round robin; then 1 shard, on rank 0
    for out in ("dp2", "one"):
        _same_up_to_rounding(pq.read_table(tmp_path / out / "samples.parquet").to_pylist(), _samples(setup["straight"]))


def test_a_rerun_with_other_sampling_settings_is_refused(setup):
    from dcd_megatron.generate import GenerateError, generate_traces

    with pytest.raises(GenerateError, match="top_p"):
        generate_traces(_cfg(setup, setup["root"] / "straight", top_p=0.8), progress=False)


@pytest.fixture(scope="module")
def known(setup):
    """The prompts again, each with a reference the teacher gives on some of its samples, and their run."""
    from dcd_megatron.generate import generate_traces

    first = _samples(setup["straight"])
    answers = []
    for i in range(len(QUESTIONS)):  # a checked (ended, retokenizing) answer of this prompt, if any
        graded = [r["predicted"] for r in first if r["prompt_index"] == i and r["reason"] in ("wrong", "kept")]
        answers.append(graded[0] if graded else "77777")
    assert sum(a != "77777" for a in answers) >= 3, answers
    prompts = _prompt_file(setup["root"] / "known.jsonl", answers)
    result = generate_traces(_cfg(setup, setup["root"] / "known", prompts=prompts), progress=False)
    return dict(answers=answers, prompts=prompts, result=result)


def test_the_filter_keeps_exactly_the_correct_samples(setup, known):
    """References set to answers the teacher gives on some samples: exactly the samples that end with eos,
    retokenize and give that answer are kept, in the dcd-train columns."""
    from dcd_megatron.eval.answers import normalize_answer

    answers, result = known["answers"], known["result"]
    rows = _samples(result)
    expected = {(r["prompt_index"], r["sample"]) for r in rows if r["predicted"] is not None
                and normalize_answer(r["predicted"]) == normalize_answer(answers[r["prompt_index"]])}
    assert expected and {(r["prompt_index"], r["sample"]) for r in rows if r["reason"] == "kept"} == expected
    kept = pq.read_table(result.traces).to_pylist()
    assert {(r["prompt_index"], r["sample"]) for r in kept} == expected
    assert all(len(r["teacher_logprobs"]) == len(r["teacher_topk_ids"]) for r in kept)
    summary = json.loads((setup["root"] / "known" / "generate_summary.json").read_text())
    assert summary["kept"] == len(expected) and summary["samples"] == len(rows)
    assert sum(summary["rejected"].values()) == len(rows) - len(expected)
    assert summary["pass@1"] == len(expected) / len(rows)
    assert [p["n_correct"] for p in summary["per_prompt"]] == [
        sum(1 for e in expected if e[0] == i) for i in range(len(QUESTIONS))]


def test_kept_traces_train_with_dcd_train_and_no_bad_row(setup, known):
    from tests.train_helpers import run_train

    traces = known["result"].traces
    out = setup["root"] / "train"
    proc = run_train(out, ["train.steps=2", "train.global_batch_size=2", "train.micro_batch_size=1",
                           f"data.train_path={traces}", f"data.valid_path={traces}", "data.on_bad_row=error",
                           f"data.tokenizer={setup['tok'] / 'tokenizer.json'}"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    metas = [json.loads(p.read_text()) for p in (out.parent / "cache").rglob("meta.json")]
    assert metas and all(m["skipped"] == {} and m["kept"] == m["rows"] for m in metas), metas
    assert all(m["has_teacher_logprobs_fraction"] == 1.0 for m in metas), metas


# ---- bad input: one line, exit 2 ------------------------------------------------------------
def _main(setup, capsys, *extra, prompts=None, out=None):
    from dcd_megatron.cli.generate import main

    code = main(["--teacher", str(setup["teacher"]), "--prompts", str(prompts or setup["prompts"]),
                 "--out", str(out or setup["root"] / "bad"), "--student-tokenizer", str(setup["tok"] / "tokenizer.json"),
                 "--template", "plain", "--n", "2", "--max-new-tokens", "4", "--no-progress", "--grade-workers", "0",
                 "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    # the one error line (megatron-core's start-up note on CPU may stand above it)
    lines = [line for line in err.splitlines() if line.startswith("dcd-generate: error")]
    return code, lines[0] if len(lines) == 1 else err


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n must be >= 1"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--backend", "sglang"], "--backend 'sglang' is not available"),
])
def test_bad_settings_are_one_line(setup, capsys, flags, message):
    code, err = _main(setup, capsys, *flags)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_bad_prompt_files_are_one_line(setup, capsys):
    no_answer = setup["root"] / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"question": "12:"}) + "\n")
    empty = setup["root"] / "empty.jsonl"
    empty.write_text("")
    for path, message in ((no_answer, "no field 'answer'"), (empty, "no problems"),
                          (setup["root"] / "missing.jsonl", "does not exist")):
        code, err = _main(setup, capsys, prompts=path)
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_a_teacher_of_another_vocabulary_is_refused(setup, capsys, tmp_path):
    from dcd_megatron.lab import task

    other = tmp_path / "other"
    task.build_tokenizer(other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    pieces = vocab["model"]["vocab"]
    a, b = [k for k, v in pieces.items() if v in (3, 4)]
    pieces[a], pieces[b] = pieces[b], pieces[a]  # two tokens swap ids
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    code, err = _main(setup, capsys, "--teacher-tokenizer", str(other / "tokenizer.json"))
    assert code == 2 and len(err.splitlines()) == 1 and "differs from the student's" in err, err


def test_an_out_in_use_is_refused(setup, capsys, tmp_path):
    from dcd_megatron.runtime.output_lock import acquire

    lock = acquire(tmp_path / "busy", setting="--out")
    try:
        code, err = _main(setup, capsys, out=tmp_path / "busy")
    finally:
        lock.release()
    assert code == 2 and len(err.splitlines()) == 1 and "busy" in err, err


def test_max_per_prompt_and_the_mlflow_run(setup, known, capsys, tmp_path):
    """--max-per-prompt 1 keeps the first correct sample of each prompt; --mlflow logs the summary."""
    from collections import Counter

    import mlflow

    from dcd_megatron.cli.generate import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "capped"
    argv = ["--teacher", str(setup["teacher"]), "--prompts", str(known["prompts"]), "--out", str(out), "--student-tokenizer",
            str(setup["tok"] / "tokenizer.json"), "--template", "plain", "--prompts-per-shard", "2",
            "--grade-workers", "0", "--device", "cpu", "--no-progress", "--max-per-prompt", "1",
            "--mlflow", "--mlflow-tracking-uri", uri, "--mlflow-experiment", "gen-test",
            *[f"--{k.replace('_', '-')}={v}" for k, v in SAMPLING.items()]]
    assert main(argv) == 0, capsys.readouterr().err
    uncapped = _samples(known["result"])
    capped = pq.read_table(out / "samples.parquet").to_pylist()
    first = {}
    for r in uncapped:
        if r["reason"] == "kept":
            first.setdefault(r["prompt_index"], r["sample"])
    assert max(Counter(r["prompt_index"] for r in uncapped if r["reason"] == "kept").values()) >= 2  # the cap bites
    assert {(r["prompt_index"], r["sample"]) for r in capped if r["reason"] == "kept"} == set(first.items())
    assert sum(r["reason"] == "over_max_per_prompt" for r in capped) == sum(r["reason"] == "kept" for r in uncapped) - len(first)
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["gen-test"], output_format="list")
    assert len(runs) == 1 and runs[0].data.metrics["kept"] == len(first), runs
    assert runs[0].data.params["top_p"] == str(SAMPLING["top_p"])


@pytest.mark.slow
@pytest.mark.later
@pytest.mark.timeout(900)
def test_the_pipeline_from_prompts_runs_end_to_end_on_two_ranks(setup, known, tmp_path):
    """recipes/pipeline.py prompts=...: generate -> train -> eval -> export on the local executor, 2 ranks
    (the prompts whose answers the tiny teacher gives on some samples, so some traces are kept)."""
    from tests.test_pipeline import PIPELINE, run_pipeline

    work = tmp_path / "work"
    settings = [f"generate_{k}={v}" for k, v in SAMPLING.items()]
    proc = run_pipeline(tmp_path, "--factory", "tiny_cpu", f"teacher={setup['teacher']}", f"prompts=gsm8k={known['prompts']}",
                        *settings, "generate_template=plain", f"work_dir={work}",
                        f"benchmarks=gsm8k={known['prompts']}", "eval_limit=2", "eval_max_new_tokens=8", "train.steps=2",
                        "train.global_batch_size=2", "train.micro_batch_size=1", "data.seq_length=64",
                        "train.eval_interval=0", "tracking.plot_interval=0", "runtime.device=cpu",
                        "run.executor=local", "run.executor.ntasks_per_node=2", "-y")
    assert PIPELINE.is_file() and proc.returncode == 0 and "pipeline: SUCCEEDED" in proc.stdout, proc.stdout[-6000:]
    kept = pq.read_table(work / "generated" / "traces.parquet")
    assert kept.num_rows == pq.read_table(known["result"].traces).num_rows > 0
    assert json.loads((work / "run" / "final_metrics.json").read_text())["step"] == 2
    assert (work / "eval" / "summary.json").is_file() and (work / "hf" / "model.safetensors").is_file()
