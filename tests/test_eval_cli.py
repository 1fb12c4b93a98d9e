"""dcd-eval end to end with a scripted fake model: protocol, results files, MLflow logging."""

import json
from pathlib import Path

import pytest

from dcd_megatron.eval import cli
from dcd_megatron.eval.benchmarks import load_problems, render_prompt
from dcd_megatron.eval.fake import scripted_model

DATA = Path(__file__).parent / "data" / "eval"


def _loader():
    """A model that answers GSM8K problems 0 and 2 right and 1 wrong, AIME problem 0 right only."""
    gsm8k = load_problems("gsm8k", DATA / "gsm8k.jsonl")
    aime = load_problems("aime", DATA / "aime.parquet")
    answers = {gsm8k[0].prompt: "3+4=7 #### 7", gsm8k[1].prompt: "\\boxed{1,000}",
               gsm8k[2].prompt: "5-8 = -3 degrees", aime[0].prompt: "so \\boxed{024}",
               aime[1].prompt: "hmm"}
    script = {render_prompt(q, "math_cot"): a for q, a in answers.items()}
    return lambda args: scripted_model(script)


def _rows(out_dir):
    return {(r["benchmark"], r["run"]): r for r in json.loads((out_dir / "summary.json").read_text())}


def test_standard_protocol_greedy_everywhere_and_samples_on_small_sets(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--benchmark", f"gsm8k={DATA / 'gsm8k.jsonl'}", "--benchmark", f"aime={DATA / 'aime.parquet'}",
            "--max-new-tokens", "40", "--n", "3", "--temperature", "1.0", "--batch-size", "2",
            "--output-dir", str(out), "--no-progress"]
    assert cli.main(argv, model_loader=_loader()) == 0
    rows = _rows(out)
    assert set(rows) == {("gsm8k", "greedy"), ("aime", "greedy"), ("aime", "sampled_t1_n3")}
    assert rows[("gsm8k", "greedy")]["accuracy"] == pytest.approx(2 / 3)
    assert rows[("aime", "greedy")]["accuracy"] == pytest.approx(0.5)
    sampled = rows[("aime", "sampled_t1_n3")]
    assert (sampled["n_samples"], sampled["temperature"], sampled["max_new_tokens"]) == (3, 1.0, 40)
    assert sampled["accuracy"] == pytest.approx(0.5)  # a confident model samples its script
    assert sampled["template"] == "math_cot" and "\\boxed{}" in sampled["template_text"]

    result = json.loads((out / "gsm8k" / "greedy" / "results.json").read_text())
    assert [r["predictions"] for r in result["records"]] == [["7"], ["1000"], ["-3"]]
    assert [r["correct"] for r in result["records"]] == [[True], [False], [True]]
    completions = (out / "aime" / "sampled_t1_n3" / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 2 * 3 and json.loads(completions[0])["completion"] == "so \\boxed{024}"
    assert "| gsm8k | greedy | 3 | 1 | 0.0 |" in capsys.readouterr().out


def test_model_loader_by_name_and_mlflow_logging(tmp_path):
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--benchmark", f"amc={DATA / 'amc.json'}", "--protocol", "greedy", "--max-new-tokens", "30",
            "--output-dir", str(out), "--no-progress", "--mlflow", "--mlflow-tracking-uri", uri,
            "--mlflow-experiment", "eval-test", "--model-loader", "dcd_megatron.eval.fake:constant_answer_loader"]
    assert cli.main(argv) == 0
    assert _rows(out)[("amc", "greedy")]["accuracy"] == 0.0  # "\boxed{0}" is never right here

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("eval-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["eval/amc/greedy/accuracy"] == 0.0
    assert run.data.metrics["eval/amc/greedy/n_problems"] == 2.0
    assert run.data.params["protocol"] == "greedy"


def test_argument_errors_are_clear(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--benchmark", "mmlu"], model_loader=_loader())
    assert "unknown benchmark 'mmlu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--benchmark", "gsm8k", "--template", "no field"], model_loader=_loader())
    assert "{question}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--benchmark", f"gsm8k={DATA / 'gsm8k.jsonl'}"])
    assert "--model-loader" in capsys.readouterr().err
