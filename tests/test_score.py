"""dcd-score: teacher log-probs match transformers' own computation, DP/TP give the same output, resumption.

Tolerance: scores are fp32 and must match log_softmax(logits / T) of the Hugging Face teacher
to 1e-5 (megatron and transformers agree bit for bit at TP=1 on CPU; TP=2 reorders sums).
"""

import json

import pyarrow.parquet as pq
import pytest
import torch

from tests.dist import run_ranks

pytestmark = pytest.mark.megatron

ATOL = 1e-5
T = 0.7
TOP_K = 3


def _score_cfg(setup, out, **kw):
    from dcd_megatron.data.config import DataConfig
    from dcd_megatron.score import ScoreConfig

    data = DataConfig(tokenizer=str(setup["tok"] / "tokenizer.json"), **kw.pop("data", {}))
    base = dict(teacher=str(setup["teacher"]), data_path=str(setup["traces"]), out_dir=str(out), data=data,
                temperature=T, top_k=TOP_K, rows_per_shard=4, batch_tokens=128, device="cpu")
    return ScoreConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama teacher (HF and converted), 10 traces (plain prompts and chat messages), one straight run."""
    from dcd_megatron.convert import convert_hf_to_mcore
    from dcd_megatron.convert.tiny import make_tiny_hf_model
    from dcd_megatron.lab import task
    from dcd_megatron.score import score

    root = tmp_path_factory.mktemp("score")
    task.build_tokenizer(root / "tok")
    hf = make_tiny_hf_model(root / "teacher-hf", arch="llama", tokenizer_dir=root / "tok", tied=False, seed=3)
    teacher = convert_hf_to_mcore(hf, root / "teacher").checkpoint
    rows = task.teacher_rows(8, k_min=2, k_max=6, style_weights={"verbose": 1.0, "skip3": 1.0}, seed=1)
    rows[0]["teacher_logprobs"] = [-1.0] * 3  # stale values must be replaced, not kept
    rows += [{"messages": [{"role": "user", "content": "12:"}, {"role": "assistant", "content": "1+2=3>3"}], "style": "chat"},
             {"prompt": "907:", "response": "9+0+7=16>16", "style": "skip2"}]
    traces = root / "traces.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = dict(root=root, tok=root / "tok", hf=hf, teacher=teacher, traces=traces, rows=rows)
    s["straight"] = score(_score_cfg(s, root / "straight"), progress=False)
    return s


def _table(result):
    return pq.read_table(result.output)


# ---- scores --------------------------------------------------------------------------------
def test_scores_match_transformers_log_softmax_at_the_trained_positions(setup):
    from transformers import AutoModelForCausalLM

    from dcd_megatron.data import load_tokenizer
    from dcd_megatron.data.config import DataConfig
    from dcd_megatron.data.encoding import RowEncoder

    tok = load_tokenizer(setup["tok"] / "tokenizer.json")
    encoder = RowEncoder(DataConfig(tokenizer=str(tok.path)), tok)  # the training pipeline, add_eos on
    hf = AutoModelForCausalLM.from_pretrained(setup["hf"], attn_implementation="eager").eval()
    out = _table(setup["straight"]).to_pylist()
    assert [r["style"] for r in out] == [r["style"] for r in setup["rows"]]  # input order and columns kept
    for row, src in zip(out, setup["rows"]):
        response = src.get("response") or src["messages"][-1]["content"]
        n = len(tok.encode(response))
        assert len(row["teacher_logprobs"]) == n + 1  # every response token and the appended eos
        enc = encoder.encode({k: v for k, v in src.items() if k != "teacher_logprobs"})
        ids = torch.tensor([enc.input_ids])
        assert enc.input_ids[-1] == tok.eos_id
        with torch.no_grad():
            ref = torch.log_softmax(hf(ids).logits[0].float() / T, dim=-1)
        pos = torch.arange(enc.response_start, len(enc.input_ids))
        want = ref[pos - 1, ids[0, pos]]
        torch.testing.assert_close(torch.tensor(row["teacher_logprobs"]), want, atol=ATOL, rtol=0)
        top = torch.topk(ref[pos - 1], TOP_K, dim=-1)
        assert torch.equal(torch.tensor(row["teacher_topk_ids"]), top.indices)
        torch.testing.assert_close(torch.tensor(row["teacher_topk_logprobs"]), top.values, atol=ATOL, rtol=0)
        # and the training pipeline accepts the row as scored: every response token + eos is trained
        again = encoder.encode(row)
        assert again.teacher is not None and again.n_trained == n + 1


def test_scored_logprobs_exclude_vocabulary_padding():
    from dcd_megatron.score import scored_logprobs

    logits = torch.randn(5, 12)
    logits[:, 10:] = 50.0  # padding columns must not take probability mass
    targets = torch.tensor([0, 3, 9, 4, 1])
    lp, ids, tlp = scored_logprobs(logits, targets, temperature=2.0, top_k=4, vocab_size=10)
    ref = torch.log_softmax(logits[:, :10] / 2.0, dim=-1)
    torch.testing.assert_close(lp, ref[torch.arange(5), targets])
    assert ids.max() < 10
    torch.testing.assert_close(tlp, torch.topk(ref, 4).values)


def test_add_eos_false_scores_only_the_response(setup, tmp_path):
    from dcd_megatron.data import load_tokenizer
    from dcd_megatron.score import score

    res = score(_score_cfg(setup, tmp_path / "noeos", top_k=0, data={"add_eos": False}), progress=False)
    tok = load_tokenizer(setup["tok"] / "tokenizer.json")
    table = _table(res)
    assert "teacher_topk_ids" not in table.column_names
    for row, src in zip(table.to_pylist(), setup["rows"]):
        response = src.get("response") or src["messages"][-1]["content"]
        assert len(row["teacher_logprobs"]) == len(tok.encode(response))


def test_bad_rows_are_refused_or_counted(setup, tmp_path):
    from dcd_megatron.data import BadRowError
    from dcd_megatron.score import score

    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": "12:", "response": "1+2=3>3"}, {"prompt": "34:", "response": ""},
            {"prompt": "5555555555:", "response": "5+5=10," * 20}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadRowError, match="row 2: empty_response"):
        score(_score_cfg(setup, tmp_path / "err", data_path=str(bad), max_length=64), progress=False)
    res = score(_score_cfg(setup, tmp_path / "skip", data_path=str(bad), max_length=64, data={"on_bad_row": "skip"}), progress=False)
    assert res.rows == 1 and res.skipped == {"empty_response": 1, "too_long": 1}
    assert json.loads((tmp_path / "skip" / "score_summary.json").read_text())["skipped"] == res.skipped


def test_a_teacher_with_another_tokenizer_is_refused(setup, tmp_path, capsys):
    from dcd_megatron.cli.score import main
    from dcd_megatron.data import build_hf_tokenizer

    other = build_hf_tokenizer(["12:1+2=3>3", "hello world"] * 20, tmp_path / "other", vocab_size=40)
    argv = ["--teacher", str(setup["teacher"]), "--data", str(setup["traces"]), "--out", str(tmp_path / "o"),
            "--student-tokenizer", str(other), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "differs from the student's" in err and not (tmp_path / "o").exists()
    assert main(argv[:6]) == 2  # no student tokenizer at all
    assert "student tokenizer is unknown" in capsys.readouterr().err


# ---- resumption ----------------------------------------------------------------------------
def test_a_crash_after_some_shards_then_a_rerun_scores_only_the_rest(setup, tmp_path, monkeypatch):
    from dcd_megatron.score import ScoreError, score
    from dcd_megatron.score import shards as sh

    out = tmp_path / "crashy"
    original = sh.write_shard
    written = []

    def crash_after_two(out_dir, index, table, skipped):
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        written.append(index)
        return original(out_dir, index, table, skipped)

    monkeypatch.setattr(sh, "write_shard", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        score(_score_cfg(setup, out), progress=False)
    assert written == [0, 1] and not (out / sh.SCORED).exists()
    (out / "shards" / "part-00002.parquet.tmp").write_bytes(b"half a file")  # a crash mid-write
    with pytest.raises(ScoreError, match="temperature"):
        score(_score_cfg(setup, out, temperature=1.0), progress=False)

    monkeypatch.setattr(sh, "write_shard", lambda *a: (written.append(a[1]), original(*a))[1])
    res = score(_score_cfg(setup, out), progress=False)
    assert written == [0, 1, 2] and res.shards_already_done == 2 and res.shards_scored_here == 1
    assert _table(res).equals(_table(setup["straight"]))
    assert not (out / "shards").exists()
    again = score(_score_cfg(setup, out), progress=False)  # a finished run is left alone
    assert again.shards_scored_here == 0 and again.rows == res.rows


# ---- data, tensor and pipeline parallel ----------------------------------------------------
def _score_on_two_ranks(rank, world_size, setup, out_dp, out_tp, out_pp):
    from dcd_megatron.score import score

    dp = score(_score_cfg(setup, out_dp), progress=False)
    tp = score(_score_cfg(setup, out_tp, tp=2), progress=False)
    pp = score(_score_cfg(setup, out_pp, pp=2), progress=False)
    return dp.shards_scored_here, tp.shards_scored_here, pp.shards_scored_here


def _assert_scores_close(path, straight):
    rows = pq.read_table(path).to_pylist()
    assert len(rows) == straight.num_rows
    for a, b in zip(rows, straight.to_pylist()):
        assert {k: v for k, v in a.items() if not k.startswith("teacher_")} == {k: v for k, v in b.items() if not k.startswith("teacher_")}
        torch.testing.assert_close(torch.tensor(a["teacher_logprobs"]), torch.tensor(b["teacher_logprobs"]), atol=ATOL, rtol=0)
        assert a["teacher_topk_ids"] == b["teacher_topk_ids"]
        torch.testing.assert_close(torch.tensor(a["teacher_topk_logprobs"]), torch.tensor(b["teacher_topk_logprobs"]), atol=ATOL, rtol=0)


def test_two_dp_ranks_write_what_one_writes_and_tp2_and_pp2_match(setup, tmp_path):
    shared = {k: setup[k] for k in ("tok", "teacher", "traces")}
    counts = run_ranks(_score_on_two_ranks, 2, shared, *(str(tmp_path / d) for d in ("dp2", "tp2", "pp2")))
    assert [c[0] for c in counts] == [2, 1]  # 3 shards, round robin over 2 DP ranks
    assert [c[1] for c in counts] == [3, 3]  # TP=2: both ranks work on every shard, rank 0 writes
    assert [c[2] for c in counts] == [3, 3]  # PP=2: both stages work on every shard, the last writes
    straight = _table(setup["straight"])
    assert pq.read_table(tmp_path / "dp2" / "scored.parquet").equals(straight)
    _assert_scores_close(tmp_path / "tp2" / "scored.parquet", straight)
    _assert_scores_close(tmp_path / "pp2" / "scored.parquet", straight)
    assert json.loads((tmp_path / "pp2" / "score_summary.json").read_text())["pp"] == 2


def _score_tp2_pp2(rank, world_size, setup, out):
    from dcd_megatron.score import score

    return score(_score_cfg(setup, out, tp=2, pp=2, batch_tokens=48), progress=False).shards_scored_here


def test_tp2_by_pp2_on_four_ranks_matches_one_process(setup, tmp_path):
    """Both parallelisms at once, with small batches so each shard is several pipelined micro-batches."""
    shared = {k: setup[k] for k in ("tok", "teacher", "traces")}
    assert run_ranks(_score_tp2_pp2, 4, shared, str(tmp_path / "tp2pp2")) == [3, 3, 3, 3]
    _assert_scores_close(tmp_path / "tp2pp2" / "scored.parquet", _table(setup["straight"]))


def test_impossible_layouts_are_refused_before_loading(setup, tmp_path, capsys):
    from dcd_megatron.cli.score import main
    from dcd_megatron.score import ScoreError, score

    argv = ["--teacher", str(setup["teacher"]), "--data", str(setup["traces"]), "--out", str(tmp_path / "a"),
            "--student-tokenizer", str(setup["tok"] / "tokenizer.json"), "--device", "cpu", "--pp", "3"]
    assert main(argv) == 2
    assert "--pp=3 must divide the teacher's num_layers=2" in capsys.readouterr().err and not (tmp_path / "a").exists()
    with pytest.raises(ScoreError, match="pp must be >= 1"):
        _score_cfg(setup, tmp_path / "b", pp=0)
    with pytest.raises(ScoreError, match=r"tp\*pp = 1\*2 = 2 must divide the world size 1"):
        score(_score_cfg(setup, tmp_path / "c", pp=2), progress=False)


def test_vocabulary_check_compares_pieces_not_special_token_roles(setup, tmp_path):
    import shutil

    from dcd_megatron.data import TokenizerError, load_tokenizer
    from dcd_megatron.score.vocabulary import check_teacher_vocabulary

    student = load_tokenizer(setup["tok"] / "tokenizer.json")
    assert check_teacher_vocabulary(student, student) is None
    instruct = shutil.copytree(setup["tok"], tmp_path / "instruct")  # same tokens, another eos role
    (instruct / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<pad>", "pad_token": "<pad>"}))
    note = check_teacher_vocabulary(student, load_tokenizer(instruct / "tokenizer.json"))
    assert note and "every token is the same" in note
    swapped = shutil.copytree(setup["tok"], tmp_path / "swapped")  # same size, two ids exchanged
    spec = json.loads((swapped / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    (swapped / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match=f"at token id {min(vocab['0'], vocab['1'])}"):
        check_teacher_vocabulary(student, load_tokenizer(swapped / "tokenizer.json"))
