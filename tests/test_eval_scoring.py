"""Scoring: the unbiased pass@k estimator, accuracy over samples, results.json, metric logging."""

import itertools
import json
import re

import pytest

from dcd_megatron.eval.benchmarks import Problem
from dcd_megatron.eval.scoring import (
    DecodingSettings,
    log_results,
    pass_at_k,
    results_table,
    save_results,
    score_benchmark,
)


def test_pass_at_k_hand_computed():
    # n=5 samples, c=2 correct, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 is c/n
    assert pass_at_k(4, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong samples: some k-subset always passes
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


@pytest.mark.parametrize("n, c, k", [(6, 2, 3), (7, 1, 2), (8, 5, 4), (5, 0, 5), (9, 3, 1)])
def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def _result():
    problems = [Problem("a", "q1", "7"), Problem("b", "q2", "\\frac12", {"level": 3})]
    completions = [["so \\boxed{7}", "so \\boxed{8}"], ["it is \\boxed{0.5}", "I give up"]]
    settings = DecodingSettings(temperature=1.0, top_p=0.95, n_samples=2, max_new_tokens=64,
                                template="math_cot", template_text="{question}")
    return score_benchmark("toy", "boxed", problems, completions, settings=settings,
                           response_tokens=[[10, 12], [8, 64]], truncated=[[False, False], [False, True]],
                           run="sampled")


def test_score_benchmark_accuracy_pass_at_k_and_health():
    result = _result()
    assert [r.correct for r in result.records] == [[True, False], [True, False]]
    assert result.records[1].predictions == ["0.5", None]
    s = result.summary()
    assert s["accuracy"] == pytest.approx(0.5)
    assert s["pass_at_1"] == pytest.approx(0.5)
    assert s["pass_at_2"] == pytest.approx(1.0)
    assert s["accuracy_stderr"] == pytest.approx(0.0)
    assert s["no_answer_fraction"] == pytest.approx(0.25)
    assert s["truncated_fraction"] == pytest.approx(0.25)
    assert s["mean_response_tokens"] == pytest.approx(23.5)


def test_results_json_states_the_protocol(tmp_path):
    path = save_results(_result(), tmp_path)
    assert path == tmp_path / "toy" / "sampled" / "results.json"
    data = json.loads(path.read_text())
    for key in ("benchmark", "n_problems", "n_samples", "temperature", "top_p", "max_new_tokens", "template",
                "accuracy", "records"):
        assert key in data
    assert (data["n_problems"], data["n_samples"], data["temperature"], data["top_p"]) == (2, 2, 1.0, 0.95)
    assert data["records"][1]["meta"] == {"level": 3}
    assert data["records"][0]["n_correct"] == 1


def test_log_results_uses_mlflow_safe_names():
    calls = []
    metrics = log_results(_result(), lambda m, step: calls.append((m, step)), step=3)
    assert calls == [(metrics, 3)]
    assert metrics["eval/toy/sampled/accuracy"] == pytest.approx(0.5)
    assert all(re.fullmatch(r"[/\w.\- :]*", k) for k in metrics)  # MLflow's allowed characters


def test_results_table_has_a_row_per_result():
    table = results_table([_result()])
    lines = table.splitlines()
    assert len(lines) == 3 and "| toy | sampled | 2 | 2 | 1.0 | 0.95 | 64 | math_cot | 50.0 |" in lines[2]


def test_completion_count_must_match_settings():
    settings = DecodingSettings(0.0, 1.0, 1, 8, "plain", "{question}")
    with pytest.raises(ValueError, match="n_samples=1"):
        score_benchmark("toy", "boxed", [Problem("a", "q", "1")], [["x", "y"]], settings=settings)
