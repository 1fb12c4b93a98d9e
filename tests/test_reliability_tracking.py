"""Issue 13, tracking and the run record: MLflow telemetry off, a tracker that catches up after the
server comes back, `dcd-train --sync-tracking`, metrics.jsonl holding each step once after a
resume, and a stopped run that says it stopped (in final_metrics.json and in MLflow)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from dcd_megatron.runtime.distributed import free_port
from dcd_megatron.tracking import Tracker, TrackingConfig
from dcd_megatron.tracking.record import read_record
from dcd_megatron.tracking.telemetry import telemetry_off

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- telemetry
def _clean_env(home: Path) -> dict:
    """The environment of a user's shell: none of the CI / pytest markers MLflow itself treats as "no telemetry"."""
    drop = {"PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS",
            "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION",
            "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID",  # mlflow.telemetry.utils
            "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "XDG_CONFIG_HOME", "MLFLOW_TRACKING_URI", "_MLFLOW_TESTING_TELEMETRY"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    return env


_TRACKER_RUN = """
    import json, sys
    from types import SimpleNamespace
    from dcd_megatron.tracking import Tracker, TrackingConfig

    class Client:  # a store that accepts everything (no network, no database)
        def __getattr__(self, name):
            return lambda *a, **k: SimpleNamespace(info=SimpleNamespace(run_id="r1"), data=SimpleNamespace(params={}))
        def get_experiment_by_name(self, name):
            return None

    tracker = Tracker(TrackingConfig(tracking_uri="http://store.invalid"), is_logging_rank=True,
                      client_factory=lambda uri: Client())
    tracker.start({"a": 1}, "a: 1\\n", sys.argv[1])
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.finish() is True
    from mlflow.telemetry import get_telemetry_client
    from mlflow.telemetry.utils import is_telemetry_disabled
    print(json.dumps({"disabled": is_telemetry_disabled(), "client": get_telemetry_client() is not None}))
"""


def test_a_tracked_run_sends_no_mlflow_telemetry(tmp_path):
    """Without the switch, this very script writes ~/.config/mlflow/telemetry.json and starts MLflow's
    telemetry client (it would also look up MLflow's telemetry host)."""
    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_TRACKER_RUN), str(tmp_path / "run")],
                          env=_clean_env(home), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"disabled": True, "client": False}  # MLflow's own verdict
    assert not list(home.rglob("telemetry.json")), list(home.rglob("*"))


def test_telemetry_switch_obeys_the_user():
    env: dict[str, str] = {}
    assert telemetry_off(env) is True and env == {"MLFLOW_DISABLE_TELEMETRY": "true"}
    for user in ({"MLFLOW_DISABLE_TELEMETRY": "false"}, {"DO_NOT_TRACK": "false"}, {"DO_NOT_TRACK": "true"}):
        env = dict(user)
        assert telemetry_off(env) is False and env == user  # the documented way to turn it on is left alone


# ---------------------------------------------------------------------------------------- a store that dies
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (a new database's migrations cost seconds)."""
    from mlflow.tracking import MlflowClient

    telemetry_off()
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


class Outage:
    """A real MLflow client whose store can be switched off (every call refused) and on again."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.down = False

    def __getattr__(self, name):
        target = getattr(self.client, name)

        def call(*args, **kwargs):
            if self.down:
                raise ConnectionError("Connection refused")
            return target(*args, **kwargs)

        return call


class Sink:
    """What train/metrics.py does with a step: queue it for the tracker, then append it to metrics.jsonl."""

    def __init__(self, tracker: Tracker, path: Path):
        self.tracker, self.path = tracker, path

    def log(self, step: int) -> None:
        values = {"loss": 10.0 - step / 10, "ce": float(step)}
        self.tracker.log_metrics(values, step)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")


def _tracker(store: str, outage: Outage, run_dir: Path, start_step: int = 0, experiment: str = "rel") -> Tracker:
    tracker = Tracker(TrackingConfig(tracking_uri=store, experiment=experiment, metrics_flush_s=0),
                      is_logging_rank=True, client_factory=lambda uri: outage)
    tracker.start({"a": 1}, "a: 1\n", run_dir, record=run_dir / "metrics.jsonl", start_step=start_step)
    assert tracker.flush(60) and tracker.run_id
    return tracker


def _steps(store: str, run_id: str, key: str = "loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(store).get_metric_history(run_id, key))


def test_tracker_replays_the_steps_a_dead_server_missed_once_it_answers(store, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dcd_megatron.tracking")
    outage, run_dir = Outage(store), tmp_path / "run"
    tracker = _tracker(store, outage, run_dir)
    sink = Sink(tracker, run_dir / "metrics.jsonl")
    for step in range(1, 4):
        sink.log(step)
    assert tracker.flush(30)
    outage.down = True
    for step in range(4, 8):
        sink.log(step)
    tracker.flush(30)  # these sends fail: the store misses steps 4-7
    outage.down = False
    for step in range(8, 11):
        sink.log(step)
    assert tracker.finish("FINISHED") is True
    for key in ("loss", "ce"):
        assert _steps(store, tracker.run_id, key) == list(range(1, 11)), key  # each step once
    from mlflow.tracking import MlflowClient

    assert MlflowClient(store).get_run(tracker.run_id).info.status == "FINISHED"
    assert any("caught up" in r.getMessage() for r in caplog.records)


def test_steps_dropped_from_a_full_queue_are_replayed(store, tmp_path):
    """A slow store (here: blocked) fills the queue of `tracking.max_pending` steps; the oldest are dropped."""
    import threading

    outage, run_dir = Outage(store), tmp_path / "run"
    tracker = Tracker(TrackingConfig(tracking_uri=store, experiment="rel", metrics_flush_s=0, max_pending=2),
                      is_logging_rank=True, client_factory=lambda uri: outage)
    tracker.start({"a": 1}, "a: 1\n", run_dir, record=run_dir / "metrics.jsonl")
    assert tracker.flush(60)
    gate = threading.Event()
    log_batch = outage.client.log_batch
    outage.client.log_batch = lambda *a, **k: (gate.wait(30), log_batch(*a, **k))
    sink = Sink(tracker, run_dir / "metrics.jsonl")
    for step in range(1, 9):
        sink.log(step)
    assert tracker.stats.dropped > 0
    gate.set()
    assert tracker.finish("FINISHED") is True
    assert _steps(store, tracker.run_id) == list(range(1, 9)) and _steps(store, tracker.run_id, "ce") == list(range(1, 9))


def test_sync_tracking_finishes_a_run_whose_server_was_down_at_the_end(store, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from dcd_megatron.cli.train import main

    outage, run_dir = Outage(store), tmp_path / "run"
    tracker = _tracker(store, outage, run_dir)
    sink = Sink(tracker, run_dir / "metrics.jsonl")
    sink.log(1)
    assert tracker.flush(30)
    outage.down = True  # dies for good: the rest of the run, and its end
    for step in range(2, 7):
        sink.log(step)
    final = {"step": 6, "status": "STOPPED", "stopped_at_step": 6, "stop_reason": "train.stop_after=6"}
    (run_dir / "final_metrics.json").write_text(json.dumps(final))
    tracker.finish("KILLED", timeout_s=10)
    client = MlflowClient(store)
    assert client.get_run(tracker.run_id).info.status == "RUNNING" and _steps(store, tracker.run_id) == [1]

    for attempt in range(2):  # a second sync sends nothing twice
        assert main(["--sync-tracking", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert f"sent {5 * 2 if attempt == 0 else 0} missing metric values" in out, out
    run = client.get_run(tracker.run_id)
    assert _steps(store, tracker.run_id) == list(range(1, 7)) and _steps(store, tracker.run_id, "ce") == list(range(1, 7))
    assert run.info.status == "KILLED"
    assert run.data.tags["dcd.stop_reason"] == "train.stop_after=6" and run.data.tags["dcd.stopped_at_step"] == "6"

    # A later process was killed (kill -9) after step 8: final_metrics.json is older than the record.
    Sink(SimpleNamespace(log_metrics=lambda *a, **k: None), run_dir / "metrics.jsonl").log(8)
    assert main(["--sync-tracking", str(run_dir)]) == 0
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "last recorded step 8" in run.data.tags["dcd.end_reason"]
    assert _steps(store, tracker.run_id)[-1] == 8


def test_a_run_whose_store_never_answered_says_so_and_sync_creates_it(store, tmp_path, capsys, caplog):
    """Issue 24: not "MLflow run None"; `--sync-tracking` creates the run and sends every step."""
    from mlflow.tracking import MlflowClient

    from dcd_megatron.cli.train import main

    outage, run_dir = Outage(store), tmp_path / "run"
    run_dir.mkdir()
    outage.down = True  # the whole life of the run
    tracker = Tracker(TrackingConfig(tracking_uri=store, experiment="never-answered", run_name="lonely",
                                     metrics_flush_s=0), is_logging_rank=True, client_factory=lambda uri: outage)
    tracker.start({"a": 1}, "a: 1\n", run_dir, record=run_dir / "metrics.jsonl")
    sink = Sink(tracker, run_dir / "metrics.jsonl")
    for step in range(1, 5):
        sink.log(step)
    (run_dir / "final_metrics.json").write_text(json.dumps({"step": 4, "status": "FINISHED"}))
    caplog.set_level(logging.WARNING, logger="dcd_megatron.tracking")
    tracker.finish("FINISHED", timeout_s=10)
    said = [r.getMessage() for r in caplog.records if "no MLflow run was created" in r.getMessage()]
    assert len(said) == 1 and "did not answer during the whole run" in said[0] and "--sync-tracking" in said[0]
    assert "None" not in said[0] and "None" not in tracker.describe() and "--sync-tracking" in tracker.describe()

    assert main(["--sync-tracking", str(run_dir)]) == 0
    assert "sent 8 missing metric values" in capsys.readouterr().out
    run = MlflowClient(store).get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED" and run.info.run_name == "lonely" and run.data.params == {"a": "1"}
    assert _steps(store, run.info.run_id) == [1, 2, 3, 4]
    assert main(["--sync-tracking", str(run_dir)]) == 0  # once created, an ordinary sync
    assert "sent 0 missing metric values" in capsys.readouterr().out


def test_sync_tracking_says_in_one_line_why_it_cannot(tmp_path, capsys):
    from dcd_megatron.cli.train import main

    assert main(["--sync-tracking", str(tmp_path / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["--sync-tracking", str(tmp_path / "run")]) == 2
    assert "no mlflow_run_id" in capsys.readouterr().err
    (tmp_path / "run" / "mlflow_run_id").write_text("abc\n")
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["--sync-tracking", str(tmp_path / "run"), f"tracking.tracking_uri={dead}"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the MLflow store" in err and len(err.strip().splitlines()) == 1, err
    assert main(["--sync-tracking", str(tmp_path / "run"), "train.steps=3"]) == 2
    assert "takes only tracking.tracking_uri" in capsys.readouterr().err


def test_a_resumed_tracker_sends_each_step_once(store, tmp_path):
    """Killed after step 7, resumed from the checkpoint of step 5: steps 6-7 are in the store already."""
    from dcd_megatron.tracking.record import truncate_record

    outage, run_dir = Outage(store), tmp_path / "run"
    first = _tracker(store, outage, run_dir)
    sink = Sink(first, run_dir / "metrics.jsonl")
    for step in range(1, 8):
        sink.log(step)
    assert first.flush(30) and _steps(store, first.run_id) == list(range(1, 8))
    outage.down = True
    first.finish("FAILED", timeout_s=5)  # as a killed process leaves it: RUNNING
    outage.down = False
    assert truncate_record(run_dir / "metrics.jsonl", 5) == 2
    second = _tracker(store, outage, run_dir, start_step=5)
    assert second.run_id == first.run_id and second.resumed
    sink.tracker = second
    for step in range(6, 10):
        sink.log(step)
    assert second.finish("FINISHED") is True
    assert _steps(store, second.run_id) == list(range(1, 10))
    assert [r["step"] for r in read_record(run_dir / "metrics.jsonl")] == list(range(1, 10))


# ---------------------------------------------------------------------------------------- the run record
def _sink(tmp_path: Path, start_step: int):
    from dcd_megatron.recipes import RECIPES
    from dcd_megatron.train.metrics import MetricsSink

    cfg = RECIPES["tiny_cpu"](str(tmp_path))
    cfg.tracking.enabled = False
    run = SimpleNamespace(cfg=cfg, is_logger=True, output_dir=tmp_path, config_text="")
    return MetricsSink(run, start_step)


def test_metrics_jsonl_drops_the_steps_a_resume_repeats(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0} for s in range(1, 8)] + [{"step": 4, "val_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo')  # torn by the kill
    sink = _sink(tmp_path, start_step=5)
    assert "dropped 3 records past step 5" in capsys.readouterr().out
    for step in range(6, 9):
        sink.log_step(step, {"loss": 0.5})
    sink.finish("FINISHED", 8, {"loss": 0.5})
    steps = [(r["step"], "val_loss" in r) for r in read_record(path)]
    assert steps == [(1, False), (2, False), (3, False), (4, False), (5, False), (4, True),
                     (6, False), (7, False), (8, False)]
    assert json.loads((tmp_path / "final_metrics.json").read_text())["status"] == "FINISHED"


def test_a_stopped_run_says_it_stopped_and_where(tmp_path):
    sink = _sink(tmp_path, start_step=0)
    for step in (1, 2, 3):
        sink.log_step(step, {"loss": 0.5})
    sink.finish("FINISHED", 3, {"loss": 0.5}, stop_reason="stop signal (SIGTERM or SIGUSR1)")
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["status"] == "STOPPED" and final["stopped_at_step"] == 3 and final["step"] == 3
    assert final["stop_reason"] == "stop signal (SIGTERM or SIGUSR1)"


def test_a_failed_run_reports_the_last_step_it_logged(tmp_path):
    sink = _sink(tmp_path, start_step=2)
    for step in (3, 4):
        sink.log_step(step, {"loss": 0.5})
    sink.finish("FAILED", 2, {"loss": 0.5})  # train() knows only the start step when a step raises
    assert json.loads((tmp_path / "final_metrics.json").read_text())["step"] == 4


def test_training_stopped_then_resumed_records_each_step_once(tmp_path):
    """Two tiny training runs: stopped by train.stop_after (STOPPED / KILLED with tags), then resumed
    after a kill left steps past the checkpoint in metrics.jsonl (each step once, FINISHED)."""
    from mlflow.tracking import MlflowClient

    from tests.train_helpers import run_train

    out = tmp_path / "run"
    first = run_train(out, ["train.steps=8", "train.stop_after=5"])
    assert first.returncode == 0, first.stdout[-4000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert (final["status"], final["stopped_at_step"], final["stop_reason"]) == ("STOPPED", 5, "train.stop_after=5")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (out / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["dcd.stopped_at_step"] == "5"

    with open(out / "metrics.jsonl", "a") as fh:  # what a process killed after step 7 leaves behind
        fh.writelines(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (6, 7))
    second = run_train(out, ["train.steps=8"])
    assert second.returncode == 0, second.stdout[-4000:]
    assert "dropped 2 records past step 5" in second.stdout
    steps = [r["step"] for r in read_record(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))
    assert json.loads((out / "final_metrics.json").read_text())["status"] == "FINISHED"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "dcd.stop_reason" not in run.data.tags
    assert _steps(f"sqlite:///{tmp_path / 'mlflow.db'}", run_id) == list(range(1, 9))
