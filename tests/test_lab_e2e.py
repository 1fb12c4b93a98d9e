"""The drift lab end to end in miniature, as `make bench-drift` runs it (a subprocess, real trainer).

Checks that the pipeline works, not what it finds: every arm x seed is trained and evaluated,
traces are correct with one teacher log-prob per token, the lab's KV-cached model reproduces
megatron's forward on trained checkpoints, same seed means same start and batches, and the
runs land in MLflow with their evaluation.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.megatron, pytest.mark.slow, pytest.mark.later]

REPO = Path(__file__).resolve().parents[1]


def test_tiny_lab_runs_every_stage_and_logs_to_mlflow(tmp_path):
    from dcd_megatron.lab import task
    from dcd_megatron.lab.arms import ARMS
    from dcd_megatron.lab.config import tiny_lab_config

    out, doc = tmp_path / "lab", tmp_path / "docs" / "results.md"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "drift_lab.py"), "--tiny", "--out", str(out), "--write", str(doc),
         f"tracking_uri={uri}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    cfg = tiny_lab_config(str(out))
    results = json.loads((out / "results.json").read_text())

    # every condition x arm x seed, evaluated on every held-out k
    everything = {(r["condition"], r["arm"], r["seed"]): r for r in results["records"]}
    skipped = {(c, a) for c, info in results["conditions"].items() for a in info["skipped_arms"]}
    assert skipped <= {("trained", "oracle")}  # the tiny teacher may write no verbose trace; a counted skip
    conditions = ("trained", "strong", "skip_heavy")
    assert set(everything) == {(c, a, s) for c in conditions for a in cfg.arms for s in cfg.seeds
                               if (c, a) not in skipped}
    runs = {(a, s): r for (c, a, s), r in everything.items() if c == "trained"}
    eval_ks = {str(k) for k in (*cfg.eval.known_k, *cfg.eval.new_k, *cfg.eval.longer_k)}
    steps = {"trained": cfg.distill.steps, "strong": cfg.strong.distill.steps,
             "skip_heavy": cfg.skip_heavy.distill.steps}
    for (condition, _, _), rec in everything.items():
        assert set(rec["accuracy"]) == eval_ks
        assert all(0 <= a["correct"] <= a["n"] == sum(a["styles"].values()) for a in rec["accuracy"].values())
        if condition == "trained":
            assert math.isfinite(rec["exposure"]["ex_acc_err_pct"])
        else:  # the scripted teacher is no model: no ExAccErr oracle
            assert rec["exposure"] is None
        assert rec["series"]["step"] == list(range(1, steps[condition] + 1))
    # the strong teacher's traces carry its exact log-probs; the oracle arm trains on the prior's style only
    strong = [json.loads(line) for line in (out / "data" / "traces_strong.jsonl").read_text().splitlines()]
    assert len(strong) == cfg.strong.count
    oracle_rows = (out / "data" / "traces_strong-verbose.jsonl").read_text().splitlines()
    assert 0 < len(oracle_rows) == sum(t["style"] == "verbose" for t in strong)
    assert results["references"]["strong teacher"]["accuracy"][str(cfg.eval.known_k[0])]["correct"] > 0

    # the reference arm's traces: each condition's, scored once per seed by that seed's prior through
    # dcd-score --reference, the teacher's log-probs kept, the scorer recorded (the trainer checked it)
    import pyarrow.parquet as pq

    from dcd_megatron.checkpoint import fingerprint

    for condition in conditions:
        for seed in cfg.seeds:
            scored = pq.read_table(out / "reference" / f"{condition}-seed{seed}" / "scored.parquet").to_pylist()
            source = [json.loads(line) for line in (out / "data" / (
                "traces.jsonl" if condition == "trained" else f"traces_{condition}.jsonl")).read_text().splitlines()]
            assert [r["response"] for r in scored] == [r["response"] for r in source]
            prior = results["priors"][str(cfg.seeds[0] if not cfg.student.prior_per_seed else seed)]["checkpoint"]
            for r, src in zip(scored, source, strict=True):
                assert r["teacher_logprobs"] == pytest.approx(src["teacher_logprobs"], abs=1e-6)
                assert len(r["student_ref_logprobs"]) == len(r["teacher_logprobs"])
                assert all(x <= 0 for x in r["student_ref_logprobs"])
                assert r["student_ref_checkpoint"] == fingerprint(Path(prior))

    # the KV-cached copy reproduces megatron's GPTModel on every trained checkpoint it loaded
    diffs = [r["kv_max_abs_diff"] for r in results["records"]]
    diffs += [ref["kv_max_abs_diff"] for ref in results["references"].values()]
    diffs.append(results["sampling"]["kv_max_abs_diff"])
    assert max(diffs) < 1e-4

    # traces: right answers (the filter, as in the paper: steps may still be wrong), one teacher
    # log-prob per response character plus EOS
    traces = [json.loads(line) for line in (out / "data" / "traces.jsonl").read_text().splitlines()]
    assert 0 < len(traces) <= cfg.traces.count  # the tiny teacher is weak: kept what came right
    assert len(traces) == sum(results["trace_styles"].values())
    wrong_steps = sum(task.first_error(t["prompt"].rstrip(":"), t["response"]) is not None for t in traces)
    assert results["sampling"]["kept_with_wrong_step"] >= wrong_steps  # counted over every kept sample
    for t in traces:
        assert task.is_correct(t["prompt"].rstrip(":"), t["response"])
        assert len(t["teacher_logprobs"]) == len(t["response"]) + 1
        assert all(math.isfinite(x) and x <= 0 for x in t["teacher_logprobs"])

    # the student starts from the prior (model only: steps count from 1, see above); same seed =
    # same start and same batches, so step 1's unweighted CE (measured before any update) agrees
    for seed in cfg.seeds:
        first = {arm: runs[(arm, seed)]["series"]["ce"][0] for arm in cfg.arms
                 if not ARMS[arm].only_style}  # the oracle filter trains on other batches
        assert max(first.values()) - min(first.values()) < 1e-5, first
    assert runs[("sft", 1)]["series"]["ce"][0] != runs[("sft", 2)]["series"]["ce"][0]  # different batches

    # MLflow: one experiment, a run per arm x seed with the evaluation added
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    mlruns = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    for arm in cfg.arms:
        for seed in cfg.seeds:
            if ("trained", arm) in skipped:
                continue
            run = mlruns[f"{arm}-seed{seed}"]
            assert run.data.tags["lab.arm"] == arm and run.data.tags["lab.seed"] == str(seed)
            assert mlruns[f"strong-{arm}-seed{seed}"].data.tags["lab.condition"] == "strong"
            assert mlruns[f"skip_heavy-{arm}-seed{seed}"].data.tags["lab.condition"] == "skip_heavy"
            assert f"eval/acc_k{cfg.eval.known_k[0]}" in run.data.metrics and "ce" in run.data.metrics

    text = doc.read_text()
    assert all(f"| {arm} |" in text for arm in cfg.arms)
    assert len(list((doc.parent / "img").glob("drift-lab-*.png"))) == 12  # four per condition
    assert "## The decision" in text and "Chosen by this run" in text
