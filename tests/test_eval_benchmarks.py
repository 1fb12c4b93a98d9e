"""Benchmark loaders on the tiny files in tests/data/eval (one per format), and their errors."""

import json
from pathlib import Path

import pytest

from dcd_megatron.eval.benchmarks import (
    BenchmarkFormatError,
    load_problems,
    read_records,
    render_prompt,
    resolve_template,
)

DATA = Path(__file__).parent / "data" / "eval"


def test_gsm8k_jsonl_reference_is_the_number_after_hashes():
    problems = load_problems("gsm8k", DATA / "gsm8k.jsonl")
    assert [p.reference for p in problems] == ["7", "1234", "-3"]
    assert problems[0].prompt.startswith("Tom has 3 apples")
    assert len({p.id for p in problems}) == 3


def test_math500_jsonl_keeps_answer_level_and_subject():
    problems = load_problems("math500", DATA / "math500.jsonl")
    assert problems[0].reference == "\\frac{1}{2}"
    assert problems[0].id == "test/prealgebra/1.json"
    assert problems[1].meta == {"level": 2, "subject": "Algebra"}


def test_math_json_without_answer_field_takes_the_boxed_solution():
    problems = load_problems("math", DATA / "math.json")
    assert [p.reference for p in problems] == ["120^\\circ", "4"]
    assert problems[0].meta == {"level": "Level 2", "type": "Prealgebra"}


def test_aime_parquet_capitalised_fields_and_int_answers():
    problems = load_problems("aime", DATA / "aime.parquet")
    assert [(p.id, p.reference) for p in problems] == [("2024-I-1", "24"), ("2024-I-2", "33")]
    assert "2^{10}" in problems[0].prompt


def test_amc_columnar_json_with_float_answers():
    problems = load_problems("amc", DATA / "amc.json")
    assert [p.reference for p in problems] == ["36", "2.5"]
    assert problems[1].meta["url"].endswith("/1")


def test_olympiadbench_joins_the_final_answer_list_without_dollars():
    problems = load_problems("olympiadbench", DATA / "olympiadbench.jsonl")
    assert [p.reference for p in problems] == ["\\frac{1}{2}", "-2, 2"]
    assert problems[1].meta["is_multiple_answer"] is True


def test_limit_and_unknown_benchmark():
    assert len(load_problems("gsm8k", DATA / "gsm8k.jsonl", limit=2)) == 2
    with pytest.raises(ValueError, match="unknown benchmark 'mmlu'"):
        load_problems("mmlu", DATA / "gsm8k.jsonl")


def test_missing_field_error_names_file_row_and_fields(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(BenchmarkFormatError) as info:
        load_problems("gsm8k", bad)
    message = str(info.value)
    assert str(bad) in message and "row 2" in message and "'question'" in message and "prompt" in message


def test_gsm8k_answer_without_hashes_is_rejected(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "it is 4"}) + "\n")
    with pytest.raises(BenchmarkFormatError, match="####"):
        load_problems("gsm8k", bad)


def test_math_without_any_answer_is_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"problem": "p", "solution": "no box here"}]))
    with pytest.raises(BenchmarkFormatError, match="row 1.*boxed"):
        load_problems("math", bad)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(BenchmarkFormatError, match="unsupported file type"):
        read_records(tmp_path / "x.csv")
    (tmp_path / "broken.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(BenchmarkFormatError, match="line 2"):
        read_records(tmp_path / "broken.jsonl")


def test_templates():
    cot = render_prompt("What is 1+1?", "math_cot")
    assert cot.startswith("What is 1+1?\n") and cot.endswith("within \\boxed{}.")
    assert render_prompt("35272:", "plain") == "35272:"
    assert render_prompt("Q", "Question: {question}\nAnswer:") == "Question: Q\nAnswer:"
    with pytest.raises(ValueError, match=r"\{question\}"):
        resolve_template("no placeholder")


def test_dataset_names_go_to_datasets_load_dataset(monkeypatch):
    """The by-name path, with ``datasets.load_dataset`` stubbed (no network here)."""
    import datasets

    calls = []
    rows = [{"question": "q", "answer": "#### 5"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or rows)
    assert load_problems("gsm8k")[0].reference == "5"  # the benchmark's default dataset
    load_problems("gsm8k", "hf:someone/gsm8k-copy:cfg@validation")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"}),
                     (("someone/gsm8k-copy", "cfg"), {"split": "validation"})]
