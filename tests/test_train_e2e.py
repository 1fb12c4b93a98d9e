"""End-to-end training on CPU with the real command: loss goes down, MLflow has it, checkpoints resume."""

import json
import os
import signal

import pytest

from tests.train_helpers import kill_group, losses, metrics, run_train, start_train, wait_for_step

pytestmark = [pytest.mark.megatron, pytest.mark.slow]


def _assert_ok(proc):
    assert proc.returncode == 0, proc.stdout[-4000:]


def _assert_learns(out, steps):
    recs = metrics(out)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    first = sum(r["loss"] for r in recs[:3]) / 3
    last = sum(r["loss"] for r in recs[-3:]) / 3
    assert last < 0.8 * first, f"loss did not go down: {first:.3f} -> {last:.3f}"


def test_single_process_run_learns_and_logs_to_embedded_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    proc = run_train(out, ["train.steps=24", "train.eval_interval=12", "tracking.plot_interval=12"])
    _assert_ok(proc)
    _assert_learns(out, 24)
    assert "final metrics:" in proc.stdout and "MLflow:" in proc.stdout
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["status"] == "FINISHED" and final["step"] == 24
    assert (out / "checkpoints" / "iter_0000024" / "meta.json").is_file()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("dcd-demo").experiment_id)
    assert run.data.params["loss.method"] == "gated"  # the default (docs/loss.md, "Defaults")
    assert run.data.params["train.steps"] == "24"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 25))
    by_step = {m.step: m.value for m in history}
    assert by_step[24] == pytest.approx(losses(out)[24], rel=1e-6)
    for key in ("ce", "weighted_ce", "ess", "lr", "grad_norm", "tokens_per_s", "weight_p90",
                "weight_first10", "weight_last10", "log_ratio_mean", "val_loss"):
        assert client.get_metric_history(run.info.run_id, key), f"metric {key} missing"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert any(p.endswith(".png") for p in plots), plots
    assert any("config" in a for a in artifacts), artifacts


def test_tp2_pp2_run_learns(tmp_path):
    out = tmp_path / "tp2pp2"
    proc = run_train(out, ["tp=2", "pp=2", "train.steps=16", "train.global_batch_size=8"], nproc=4, timeout=900)
    _assert_ok(proc)
    assert "layout tp=2 pp=2 cp=1 dp=1" in proc.stdout
    _assert_learns(out, 16)


def test_resume_at_another_layout_goes_on_from_the_checkpoint(tmp_path):
    """Stopped at step 4 in one process, resumed at TP=2 on two: the checkpoint reshards, both ranks
    verify their share of its files, and the losses go on as the uninterrupted run's (to TP rounding).
    (kill -9 resumes, bit for bit at one layout: tests/test_reliability_faults.py.)"""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _assert_ok(run_train(straight, ["train.steps=8"]))
    first = run_train(resumed, ["train.steps=8", "train.stop_after=4"])
    _assert_ok(first)
    assert "stopping after step 4" in first.stdout
    second = run_train(resumed, ["train.steps=8", "tp=2"], nproc=2)
    _assert_ok(second)
    assert "resumed from" in second.stdout and "iter_0000004" in second.stdout
    assert "resume changes [free] parallel.tp: 2 vs 1" in second.stdout
    assert "written by 1 ranks and this run has 2" in second.stdout
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == list(range(1, 9))
    for step in range(1, 5):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (step, a[step], b[step])
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], rel=2e-3), (step, a[step], b[step])


def test_training_survives_the_tracking_server_dying(tmp_path):
    from mlflow.tracking import MlflowClient

    from tests.mlflow_server import running_mlflow_server
    from tests.train_helpers import train_env

    with running_mlflow_server(tmp_path / "server") as server:
        out = tmp_path / "run"
        proc = start_train(out, ["train.steps=30"], env=train_env(tmp_path, tracking_uri=server.uri))
        try:
            wait_for_step(out, 6, proc)
            # frozen while the server dies, so the run has steps left to send to a dead server
            # however fast it trains (on an idle machine 30 tiny steps take a few seconds)
            os.killpg(proc.pid, signal.SIGSTOP)
            stopped_at = metrics(out)[-1]["step"]
            client = MlflowClient(server.uri)
            exp = client.get_experiment_by_name("dcd-demo")
            (run,) = client.search_runs(exp.experiment_id)
            server.stop()
            os.killpg(proc.pid, signal.SIGCONT)
            assert proc.wait(timeout=600) == 0, (out.parent / "run.log").read_text()[-4000:]
        finally:
            if proc.poll() is None:
                kill_group(proc)
    log = (out.parent / "run.log").read_text()
    assert metrics(out)[-1]["step"] == 30
    assert stopped_at < 30 and "warn" in log.lower(), (stopped_at, log[-3000:])
    stored = MlflowClient(server.backend_uri).get_metric_history(run.info.run_id, "loss")
    assert len(stored) >= 1 and all(1 <= m.step <= 30 for m in stored)


def test_topk_kl_term_trains_end_to_end(tmp_path):
    """loss.term=topk_kl with data.topk: demo traces given a synthetic teacher top-4 per token."""
    import math

    from dcd_megatron.data import load_tokenizer
    from dcd_megatron.recipes import DEMO_DIR

    tok = load_tokenizer(str(DEMO_DIR / "tokenizer.json"))
    k = 4
    rows = []
    for line in (DEMO_DIR / "train.jsonl").read_text().splitlines()[:300]:
        row = json.loads(line)
        targets = tok.encode(row["response"]) + [tok.eos_id]
        assert len(targets) == len(row["teacher_logprobs"])
        ids, lps = [], []
        for y, lp in zip(targets, row["teacher_logprobs"]):
            rest = max(1.0 - math.exp(lp), 1e-6) / (2 * (k - 1))  # half the remaining mass to k-1 others
            ids.append([y] + [(y + j) % tok.vocab_size for j in range(1, k)])
            lps.append([lp] + [math.log(rest)] * (k - 1))
        rows.append(dict(row, teacher_topk_ids=ids, teacher_topk_logprobs=lps))
    data = tmp_path / "topk.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = tmp_path / "run"
    proc = run_train(out, [
        "train.steps=16", "train.eval_interval=0", "loss.term=topk_kl", "data.topk=4",
        f"data.train_path={data}", "data.valid_path=null", "tracking.plot_interval=0",
    ])
    _assert_ok(proc)
    _assert_learns(out, 16)


def test_a_vocab_size_below_the_tokenizer_stops_with_one_line(tmp_path):
    """Checked before the model is built: megatron would fail with an IndexError in the embedding."""
    proc = run_train(tmp_path / "run", ["train.steps=1", "model.vocab_size=10"], timeout=300)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "model.vocab_size=10 is smaller than the tokenizer's 18 ids" in proc.stdout
    assert "Traceback" not in proc.stdout


KNOWLEDGE = ("weight_mass_certain", "weight_mass_fork", "weight_certain_unlearned", "certain_token_frac")


def test_gated_run_logs_the_knowledge_metrics_to_mlflow_and_prints_them(tmp_path):
    """loss.method=gated: the knowledge / fork diagnostics every step in MLflow, their curve plot, the summary."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    proc = run_train(out, ["train.steps=6", "loss.method=gated", "loss.gate_power=16", "loss.tau=0.5",
                           "tracking.plot_interval=3"])
    _assert_ok(proc)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("dcd-demo").experiment_id)
    assert run.data.params["loss.method"] == "gated" and run.data.params["loss.gate_power"] == "16.0"
    history = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} for k in KNOWLEDGE}
    for key, values in history.items():
        assert sorted(values) == list(range(1, 7)), key
    for step in range(1, 7):
        assert 0 < history["certain_token_frac"][step] < 1  # the demo teacher is sure of some tokens, not all
        assert history["weight_mass_certain"][step] + history["weight_mass_fork"][step] == pytest.approx(1.0)
        # the gate gives teacher-certain tokens more of the weight than their share of the tokens
        assert history["weight_mass_certain"][step] > history["certain_token_frac"][step]
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/knowledge_weights.png" in plots, plots

    text = proc.stdout
    assert "knowledge vs forks (teacher-certain tokens, p_teacher >= 0.9" in text
    assert "***REDACTED***" not in text  # no metric name or value looks like a secret to the console filter
    for key in KNOWLEDGE[:3]:
        first, last = history[key][1], history[key][6]
        assert f"  {key:<25}{first:.4f} (step 1) -> {last:.4f} (step 6)" in text, text[-3000:]
    assert "falling towards 0 means the loss is starving knowledge" in text


def test_validation_loss_uses_the_tau_of_the_current_step(tmp_path):
    """tau anneals 0.05 -> 1e9 over 2 steps: validated after step 2, every sigmoid weight is 1/2."""
    out = tmp_path / "run"
    proc = run_train(out, ["train.steps=2", "train.eval_interval=2", "loss.method=sigmoid", "loss.tau=0.05",
                           "loss.tau_end=1e9", "loss.tau_anneal_steps=2"])
    _assert_ok(proc)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r for r in records if "val_ce" in r]
    assert val["step"] == 2
    # at step 0's tau (0.05) the weights would spread far from 1/2
    assert val["val_weighted_ce"] == pytest.approx(0.5 * val["val_ce"], rel=1e-6)
