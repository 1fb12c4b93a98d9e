"""Issue 13 items 4, 9 and 10a-10d: bad input is one line naming the problem and the fix (exit 2), never a traceback.

Each test reproduces one finding: empty / blank / all-bad trace files, a string teacher log-prob,
characters the tokenizer cannot encode, dcd-eval's and dcd-train --config's user errors,
dcd-convert's unreadable inputs, dcd-score's bad-row pointer and its missing tokenizers.
All in process on CPU (one dcd-train subprocess, for the exit code users see).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dcd_megatron.data import (
    BadRowError,
    DataConfig,
    DataLoadError,
    TokenCache,
    build_caches,
    build_token_cache,
    load_tokenizer,
    train_sentencepiece,
)
from dcd_megatron.data.validation import RowProblem, check_logprob_column, check_topk

DEMO = Path(__file__).resolve().parents[1] / "dcd_megatron" / "assets" / "demo"
DEMO_TOKENIZER = DEMO / "tokenizer.json"  # digits and + = , > : only; anything else is its unknown token (<pad>)
BENCH = Path(__file__).parent / "data" / "eval" / "gsm8k.jsonl"


@pytest.fixture(scope="module")
def demo_tok():
    return load_tokenizer(DEMO_TOKENIZER)


def _cfg(tmp_path, train_path, **kw) -> DataConfig:
    kw.setdefault("seq_length", 64)
    return DataConfig(train_path=str(train_path), tokenizer=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"),
                      num_proc=1, **kw)


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _row(tok, prompt="12:", response="1+2=3>3", **extra) -> dict:
    return {"prompt": prompt, "response": response, **extra}


def _one_error_line(err: str, prog: str) -> str:
    """The single `prog: error: ...` line of stderr (other lines may be megatron's start-up note)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error")]
    assert len(lines) == 1, err
    return lines[0]


# ---- item 4: a trace path with no rows ------------------------------------------------------
@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank-lines"])
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_a_trace_file_without_rows_is_one_line_naming_the_setting(tmp_path, demo_tok, content, policy):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    with pytest.raises(DataLoadError, match=r"data.train_path=.*empty.jsonl holds no rows to train on"):
        build_token_cache(str(empty), _cfg(tmp_path, empty, on_bad_row=policy), demo_tok)
    good = _jsonl(tmp_path / "good.jsonl", [_row(demo_tok)] * 3)
    cfg = _cfg(tmp_path, good, valid_path=str(empty), on_bad_row=policy)
    with pytest.raises(DataLoadError, match=r"data.valid_path=.*holds no rows to validate on.*data.valid_path=null"):
        build_caches(cfg, demo_tok)


def test_an_empty_file_among_others_is_warned_and_the_rest_is_used(tmp_path, demo_tok, caplog):
    (tmp_path / "d").mkdir()
    _jsonl(tmp_path / "d" / "a.jsonl", [_row(demo_tok)] * 2)
    (tmp_path / "d" / "b.jsonl").write_text("\n")
    cache = TokenCache.open(build_token_cache(str(tmp_path / "d"), _cfg(tmp_path, tmp_path / "d"), demo_tok))
    assert cache.meta["kept"] == 2 and "b.jsonl holds no rows" in caplog.text


def test_a_file_whose_every_row_is_bad_says_so_under_skip(tmp_path, demo_tok):
    bad_json = _jsonl(tmp_path / "json.jsonl", ["{oops", '{"prompt": '])
    with pytest.raises(DataLoadError, match=r"no usable rows: all 2 were skipped as bad \{'invalid_json': 2\}.*row 1"):
        build_token_cache(str(bad_json), _cfg(tmp_path, bad_json, on_bad_row="skip"), demo_tok)
    bad_rows = _jsonl(tmp_path / "rows.jsonl", [{"prompt": "1:"}, _row(demo_tok, response=" ")])
    with pytest.raises(DataLoadError, match=r"all 2 were skipped as bad \{'empty_response': 1, 'missing_field': 1\}"):
        build_token_cache(str(bad_rows), _cfg(tmp_path, bad_rows, on_bad_row="skip"), demo_tok)


def test_dcd_train_on_an_empty_file_exits_2_with_one_line(tmp_path):
    """The one subprocess here (~10 s): what a user sees, from the console script's exit code to stderr."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dcd_megatron.cli.train", "--recipe", "tiny_cpu", f"data.train_path={empty}",
         f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "data.on_bad_row=skip"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr, "dcd-train")
    assert f"data.train_path={empty} holds no rows to train on" in line


# ---- item 10a: strings where numbers belong ---------------------------------------------------
def test_a_string_teacher_logprob_is_refused_not_read_as_a_number(tmp_path, demo_tok):
    n = len(demo_tok.encode("1+2=3>3"))
    rows = [_row(demo_tok, teacher_logprobs=[-0.5] * n)] * 2
    rows.insert(1, _row(demo_tok, teacher_logprobs=[-0.5] * (n - 1) + ["-0.5"]))
    path = _jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(BadRowError, match=r"row 2: wrong_type: teacher_logprobs\[\d+\] must be a float, got '-0.5'"):
        build_token_cache(str(path), _cfg(tmp_path, path), demo_tok)
    cache = TokenCache.open(build_token_cache(str(path), _cfg(tmp_path, path, on_bad_row="skip"), demo_tok))
    assert cache.meta["skipped"] == {"wrong_type": 1} and list(cache.doc_rows) == [0, 2]


def test_top_k_ids_and_logprobs_must_be_numbers():
    assert check_topk([[1, 2], [3, 4]], [[-0.1, -0.2], [-0.3, -0.4]], 2, False) is None
    assert check_topk([[1, 2], [3, "4"]], [[-0.1, -0.2], [-0.3, -0.4]], 2, False) == RowProblem(
        "wrong_type", "teacher_topk_ids[1][1] must be an integer, got '4'")
    assert check_topk([[1, 2], [3, 4]], [[-0.1, "-0.2"], [-0.3, -0.4]], 2, False) == RowProblem(
        "wrong_type", "teacher_topk_logprobs[0][1] must be a float, got '-0.2'")
    assert check_topk([[1, 2.5]], [[-0.1, -0.2]], 1, False).reason == "wrong_type"


# ---- issue 24 item 1: booleans are never numbers; top-k ids in range; log-probs <= 0 -------------
def test_booleans_out_of_range_ids_and_positive_logprobs_are_refused_per_row():
    assert check_topk([[1, -1]], [[-0.1, float("nan")]], 1, False, vocab_size=8) is None  # -1 pads, NaN beside it
    assert check_topk([[True, 2]], [[-0.1, -0.2]], 1, False) == RowProblem(
        "wrong_type", "teacher_topk_ids[0][0] must be an integer, got True")
    assert check_topk([[1, 2]], [[-0.1, False]], 1, False).detail.startswith("teacher_topk_logprobs[0][1] must be a float")
    assert check_topk([[1], [2, -5]], [[-0.1], [-0.2, -0.3]], 2, False, vocab_size=8) == RowProblem(
        "topk_id_out_of_range", "teacher_topk_ids[1][1] = -5 is neither -1 (padding) nor a token id [0, 8)")
    assert check_topk([[8]], [[-0.1]], 1, False, vocab_size=8).reason == "topk_id_out_of_range"
    assert check_topk([[1, 2]], [[-0.1, 0.5]], 1, False).detail.startswith("teacher_topk_logprobs[0][1] = 0.5 > 0")
    assert check_topk([[1, 2]], [[-0.1, float("-inf")]], 1, False).reason == "nonfinite_logprob"
    assert check_logprob_column("teacher_logprobs", [-0.5, False], 2, False)[1] == RowProblem(
        "wrong_type", "teacher_logprobs[1] must be a float, got False")
    assert check_logprob_column("teacher_logprobs", np.array([True, False]), 2, False)[1].reason == "wrong_type"
    assert check_logprob_column("student_ref_logprobs", [-0.5, 0.00005], 2, False)[1] is None  # rounding
    assert check_logprob_column("student_ref_logprobs", [-0.5, 0.01], 2, False)[1].detail.startswith(
        "student_ref_logprobs[1] = 0.01 > 0")


BAD_ROWS = {  # the findings: each was stored silently before
    "negative-id": ({"teacher_topk_ids": [[-5, 1]]}, "topk_id_out_of_range", r"teacher_topk_ids\[0\]\[0\] = -5"),
    "true-id": ({"teacher_topk_ids": [[True, True]]}, "wrong_type", r"teacher_topk_ids\[0\]\[0\] must be an integer, got True"),
    "false-logprob": ({"teacher_logprobs": [False]}, "wrong_type", r"teacher_logprobs\[0\] must be a float, got False"),
}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "saved"])
@pytest.mark.parametrize("bad", sorted(BAD_ROWS))
def test_every_reader_refuses_the_bad_row_by_file_and_row_or_counts_it(tmp_path, demo_tok, fmt, bad):
    import datasets

    n = len(demo_tok.encode("5"))
    good = _row(demo_tok, response="5", teacher_logprobs=[-0.5] * n, teacher_topk_ids=[[2, 1]] * n,
                teacher_topk_logprobs=[[-0.5, -1.0]] * n)
    change, reason, detail = BAD_ROWS[bad]
    rows = [good, {**good, **change}, good]
    if fmt == "jsonl":
        path = _jsonl(tmp_path / "t.jsonl", rows)
    else:  # typed columns: a column is one type, so the bad value makes the whole column that type
        rows = [{**good, **change}] * 3
        ds = datasets.Dataset.from_list(rows)
        path = tmp_path / ("t.parquet" if fmt == "parquet" else "saved")
        ds.to_parquet(str(path)) if fmt == "parquet" else ds.save_to_disk(str(path))
    bad_row = 2 if fmt == "jsonl" else 1
    with pytest.raises(BadRowError, match=rf"row {bad_row}: {reason}: {detail}"):
        build_token_cache(str(path), _cfg(tmp_path, path, topk=2), demo_tok)
    if fmt == "jsonl":
        cache = TokenCache.open(build_token_cache(str(path), _cfg(tmp_path, path, topk=2, on_bad_row="skip"), demo_tok))
        assert cache.meta["skipped"] == {reason: 1} and list(cache.doc_rows) == [0, 2]


def test_truncation_is_said_on_the_console_with_its_total(tmp_path, demo_tok, caplog):
    path = _jsonl(tmp_path / "long.jsonl", [_row(demo_tok), _row(demo_tok, response="1+2=3>3" * 20)])
    for _ in range(2):  # built, then reused: said both times
        caplog.clear()
        build_token_cache(str(path), _cfg(tmp_path, path, seq_length=32, on_long_row="truncate"), demo_tok)
        lines = [r.getMessage() for r in caplog.records if "truncated to data.seq_length" in r.getMessage()]
        assert len(lines) == 1 and "long.jsonl: 1 of 2 rows" in lines[0], caplog.text
        cut = TokenCache.open(build_token_cache(str(path), _cfg(tmp_path, path, seq_length=32, on_long_row="truncate"),
                                                demo_tok)).meta["truncated_tokens"]
        assert f"({cut} response tokens cut" in lines[0] and cut > 0


def test_nan_lr_missing_valid_path_and_a_misspelt_override_say_what_to_fix(tmp_path, demo_tok):
    from dcd_megatron.configs import apply_overrides
    from dcd_megatron.configs.overrides import ConfigError
    from dcd_megatron.configs.train import TrainConfig

    with pytest.raises(ValueError, match=r"^optim.lr must be a finite number > 0, got nan$"):
        apply_overrides(TrainConfig(), ["optim.lr=nan"])
    with pytest.raises(ConfigError, match=r"unknown key train.stpes \(did you mean train.steps\?\)"):
        apply_overrides(TrainConfig(), ["train.stpes=5"])
    with pytest.raises(ConfigError, match=r"unknown key trian \(did you mean train\?\)"):
        apply_overrides(TrainConfig(), ["trian.steps=5"])
    good = _jsonl(tmp_path / "good.jsonl", [_row(demo_tok)] * 2)
    missing = tmp_path / "valid.jsonl"
    with pytest.raises(DataLoadError, match=rf"^data.valid_path: {missing} does not exist$"):
        build_caches(_cfg(tmp_path, good, valid_path=str(missing)), demo_tok)


# ---- item 10b: characters the tokenizer cannot encode ----------------------------------------
def test_unknown_characters_are_counted_warned_and_refused_above_the_limit(tmp_path, demo_tok, caplog):
    assert demo_tok.encode_counting_unknown("12:") == (demo_tok.encode("12:"), 0)
    assert demo_tok.encode_counting_unknown("1é<pad>")[1] == 1  # a literal "<pad>" is the token itself
    rows = [_row(demo_tok) for _ in range(50)] + [_row(demo_tok, prompt="x12:")]
    path = _jsonl(tmp_path / "u.jsonl", rows)
    with pytest.raises(DataLoadError) as info:
        build_token_cache(str(path), _cfg(tmp_path, path), demo_tok)
    msg = str(info.value)
    assert "1 of " in msg and "u.jsonl: row 51" in msg and "data.max_unknown_char_frac (now 0.001)" in msg
    # the cache was built (a policy, not a property of the tokens): a higher limit reuses it, with a warning
    cache = TokenCache.open(build_token_cache(str(path), _cfg(tmp_path, path, max_unknown_char_frac=0.01), demo_tok))
    assert (cache.meta["unknown_chars"], cache.meta["unknown_chars_by_file"]) == (1, {str(path): 1})
    assert cache.meta["chars"] == sum(len(r["prompt"]) + len(r["response"]) for r in rows)
    assert "not in the tokenizer's vocabulary" in caplog.text and "accepted" in caplog.text
    with pytest.raises(DataLoadError, match="max_unknown_char_frac"):  # and a lower one refuses the reused cache
        build_token_cache(str(path), _cfg(tmp_path, path, max_unknown_char_frac=0.0), demo_tok)


def test_sentencepiece_unknown_pieces_count_their_characters(tmp_path):
    sp = load_tokenizer(train_sentencepiece(["hello world abc"] * 5, tmp_path / "sp"))
    ids, unknown = sp.encode_counting_unknown("hello éé wörld")
    assert ids == sp.encode("hello éé wörld") and unknown == 3 and sp.unk_id in ids


# ---- item 9: dcd-eval -------------------------------------------------------------------------
def _eval(argv, capsys, tmp_path):
    from dcd_megatron.eval import cli

    code = cli.main([*argv, "--output-dir", str(tmp_path / "eval"), "--no-progress"])
    return code, _one_error_line(capsys.readouterr().err, "dcd-eval")


@pytest.mark.parametrize("content, expected", [
    ('{"question": "q", "answer": "#### 1"}\n{"prompt": "q"}\n', r"b.jsonl: row 2: no field 'question'"),
    ("", r"no problems for benchmark 'gsm8k' \(the file holds no rows\)"),
    ('{"question": "q", "answer": "#### 1"}\n{oops\n', r"line 2 is not JSON .*fix or remove that line"),
], ids=["missing-field", "empty", "bad-json"])
def test_dcd_eval_bad_benchmark_files_are_one_line_before_the_model_loads(tmp_path, capsys, content, expected):
    bench = tmp_path / "b.jsonl"
    bench.write_text(content)
    code, line = _eval(["--benchmark", f"gsm8k={bench}", "--checkpoint", str(tmp_path / "nothing")], capsys, tmp_path)
    assert code == 2 and re.search(expected, line), line


def test_dcd_eval_missing_checkpoint_and_bad_loader_are_one_line(tmp_path, capsys):
    code, line = _eval(["--benchmark", f"gsm8k={BENCH}", "--checkpoint", str(tmp_path / "missing")], capsys, tmp_path)
    assert code == 2 and f"--checkpoint {tmp_path / 'missing'}:" in line and "dcd-train checkpoint" in line
    code, line = _eval(["--benchmark", f"gsm8k={BENCH}", "--model-loader", "no_such_module:f"], capsys, tmp_path)
    assert code == 2 and "cannot import 'no_such_module'" in line


# ---- item 9: dcd-train --config -------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("data:\n  seq_length: 64\n  x: [oops\n", r"c.yaml is not valid YAML: .* at line 4, column 1; fix the file"),
    ("- data\n- train\n", r"c.yaml: the top level must be a mapping of sections .*got a list"),
    ("dat:\n  seq_length: 64\n", r"c.yaml: unknown config key\(s\) dat \(did you mean data\?\)"),
    ("data:\n  seq_lenght: 64\n", r"unknown config key\(s\) data.seq_lenght \(did you mean data.seq_length\?\)"),
], ids=["malformed", "not-a-mapping", "unknown-section", "unknown-key"])
def test_dcd_train_config_errors_name_the_file(tmp_path, capsys, text, expected):
    from dcd_megatron.cli.train import main

    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert main(["--config", str(config), "--print-config"]) == 2
    line = _one_error_line(capsys.readouterr().err, "dcd-train")
    assert re.search(expected, line), line


def test_an_override_that_is_not_yaml_is_one_line(capsys):
    from dcd_megatron.cli.train import main

    assert main(["--recipe", "tiny_cpu", "--print-config", "data.train_path=[oops"]) == 2
    assert "quote it, e.g. data.train_path='...'" in _one_error_line(capsys.readouterr().err, "dcd-train")


# ---- item 9: dcd-convert ----------------------------------------------------------------------
def test_dcd_convert_unreadable_inputs_are_one_line(tmp_path, capsys):
    from dcd_megatron.cli.convert import main

    hf = tmp_path / "hf"
    hf.mkdir()
    out = ["--out", str(tmp_path / "out")]
    assert main(["hf-to-mcore", "--hf", str(tmp_path / "missing"), *out]) == 2
    assert "has no config.json" in _one_error_line(capsys.readouterr().err, "dcd-convert")
    (hf / "config.json").write_text("{oops")
    assert main(["hf-to-mcore", "--hf", str(hf), *out]) == 2
    assert "config.json is not valid JSON" in _one_error_line(capsys.readouterr().err, "dcd-convert")
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4,
        "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 18, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "torch_dtype": "float32"}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf / name).write_bytes((DEMO / name).read_bytes())
    (hf / "model.safetensors").write_bytes(b"not safetensors")
    assert main(["hf-to-mcore", "--hf", str(hf), *out]) == 2
    assert "model.safetensors is not a readable safetensors file" in _one_error_line(capsys.readouterr().err, "dcd-convert")
    assert main(["mcore-to-hf", "--checkpoint", str(tmp_path / "missing"), *out]) == 2
    assert "dcd-train checkpoint" in _one_error_line(capsys.readouterr().err, "dcd-convert")


# ---- items 10c, 10d: dcd-score --------------------------------------------------------------
def test_dcd_score_bad_rows_name_file_and_row_and_point_to_score_summary(tmp_path):
    from dcd_megatron.score import ScoreConfig
    from dcd_megatron.score.runner import _bad_row

    (tmp_path / "traces").mkdir()
    _jsonl(tmp_path / "traces" / "a.jsonl", [{"prompt": "1:", "response": "1"}] * 2)
    _jsonl(tmp_path / "traces" / "b.jsonl", [{"prompt": "1:", "response": "1"}, "{oops", {"prompt": "2:", "response": " "}])
    cfg = ScoreConfig(teacher="t", data_path=str(tmp_path / "traces"), out_dir=str(tmp_path / "out"),
                      data=DataConfig(tokenizer=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache"), on_bad_row="skip"))
    err = _bad_row(cfg, 3, RowProblem("empty_response", "the response is empty"))  # 4th row overall: b.jsonl line 3
    assert (err.source, err.row) == (str(tmp_path / "traces" / "b.jsonl"), 3)
    assert f"counted in {tmp_path / 'out' / 'score_summary.json'}" in str(err) and "meta.json" not in str(err)
    long = _bad_row(cfg, 0, RowProblem("too_long", "99 tokens > the scoring limit --max-length=64"))
    assert "raise --max-length" in str(long) and "data.on_long_row" not in str(long)


def test_dcd_score_names_whose_tokenizer_is_missing(tmp_path, capsys, monkeypatch):
    import dcd_megatron.checkpoint as checkpoint
    from dcd_megatron.cli.score import main
    from dcd_megatron.configs.train import TrainConfig

    teacher = TrainConfig()
    teacher.data.tokenizer = str(tmp_path / "gone" / "tokenizer.json")
    monkeypatch.setattr(checkpoint, "read_checkpoint_config", lambda path: (Path(path), teacher, {}))
    traces = _jsonl(tmp_path / "t.jsonl", [{"prompt": "1:", "response": "1"}])
    argv = ["--teacher", str(tmp_path / "teacher"), "--data", str(traces), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main([*argv, "--student-tokenizer", str(DEMO_TOKENIZER)]) == 2
    line = _one_error_line(capsys.readouterr().err, "dcd-score")
    assert "the teacher's tokenizer: data.tokenizer=" in line and "gone" in line and "--teacher-tokenizer" in line
    assert main([*argv, "--student-tokenizer", str(tmp_path / "nope.json")]) == 2
    line = _one_error_line(capsys.readouterr().err, "dcd-score")
    assert "the student's tokenizer:" in line and "--student-tokenizer" in line
    assert not (tmp_path / "out").exists()


def test_dcd_score_reads_a_mixed_type_teacher_column_and_names_any_other(tmp_path):
    """The mixed-type JSONL that training reads row by row (item 10a) loads for scoring too: the stale
    teacher columns are replaced anyway; another mixed column is one line naming it."""
    from dcd_megatron.score import ScoreConfig, ScoreError
    from dcd_megatron.score.runner import _load_input

    def cfg(path):
        return ScoreConfig(teacher="t", data_path=str(path), out_dir=str(tmp_path / "out"),
                           data=DataConfig(tokenizer=str(DEMO_TOKENIZER), cache_dir=str(tmp_path / "cache")))

    stale = _jsonl(tmp_path / "a.jsonl", [{"prompt": "1:", "response": "1", "teacher_logprobs": [-0.5, "-0.5"]},
                                          {"prompt": "2:", "response": "2"}])
    assert _load_input(cfg(stale)).column_names == ["prompt", "response"]
    mixed = _jsonl(tmp_path / "b.jsonl", [{"prompt": "1:", "response": "1", "style": 3},
                                          {"prompt": "2:", "response": "2", "style": "short"}])
    with pytest.raises(ScoreError, match="column 'style' mixes value types"):
        _load_input(cfg(mixed))
    empty = tmp_path / "c.jsonl"
    empty.write_text("\n")
    with pytest.raises(ScoreError, match="holds no rows to score"):
        _load_input(cfg(empty))
