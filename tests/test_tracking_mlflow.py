"""The tracker against real MLflow stores: embedded SQLite and a real ``mlflow server`` (also one that dies)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dcd_megatron.runtime.distributed import free_port
from dcd_megatron.tracking import Tracker, TrackingConfig
from dcd_megatron.tracking.tracker import RUN_ID_FILE
from tests.mlflow_server import mlflow_server_module  # noqa: F401  (pytest fixture)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CALL_BOUND_S = 10.0  # a logging call must return within this even when the server is gone (well below the
# tracker timeouts a blocked call would wait out; the slack is for a loaded machine, where a call is descheduled)
SETUP_BOUND_S = 180.0  # run setup on a fresh store: seconds when idle, much longer on 2 shared, busy cores


def _config() -> dict:
    # 130 extra keys push the params past one 100-param batch; one value past MLflow's 6000-char cap.
    return {
        "model": {"hidden": 64, "layers": 2, "rope": True, "spec": {"kind": "local"}},
        "train": {"lr": 3e-4, "steps": 200, "micro_batches": [1, 2]},
        "data": {"path": "/data/traces.jsonl", "tokenizer": "/tok", "note": "n" * 7000},
        "extra": {f"k{i:03d}": i for i in range(130)},
    }


def _expected_params() -> dict[str, str]:
    expected = {
        "model.hidden": "64",
        "model.layers": "2",
        "model.rope": "True",
        "model.spec.kind": "local",
        "train.lr": "0.0003",
        "train.steps": "200",
        "train.micro_batches": "[1,2]",
        "data.path": "/data/traces.jsonl",
        "data.tokenizer": "/tok",
    }
    expected.update({f"extra.k{i:03d}": str(i) for i in range(130)})
    return expected


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """One folder whose ./mlruns/mlflow.db the embedded-store tests share (creating a database costs 3-12 s)."""
    return tmp_path_factory.mktemp("embedded")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _weights_for_plots():
    edges = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
    counts = [5, 10, 20, 40, 15, 3]
    pos_edges = [i / 5 for i in range(6)]
    pos_mean = [1.2, 1.1, 1.0, float("nan"), 0.8]
    return edges, counts, pos_edges, pos_mean


def _run_round_trip(uri: str | None, run_dir: Path, tmp_path: Path) -> None:
    """Log a config, metrics, plots, a file and a text through the tracker; read all of it back."""
    cfg = _config()
    config_text = yaml.safe_dump(cfg)
    tracker = Tracker(
        TrackingConfig(
            tracking_uri=uri, run_name="round-trip", plot_interval=50, timeout_s=60, finish_timeout_s=SETUP_BOUND_S
        ),
        is_logging_rank=True,
    )
    tracker.start(cfg, config_text, run_dir)
    assert tracker.flush(SETUP_BOUND_S)  # start() waits 30 s at most; a new database on a loaded machine can take longer
    assert tracker.run_id is not None, tracker.describe()
    assert (run_dir / RUN_ID_FILE).read_text().strip() == tracker.run_id
    sent = {step: {"loss": 2.0 / step, "weights/ess": 0.9 - 0.01 * step, "lr": 1e-4 * step} for step in (10, 20, 30)}
    for step, metrics in sent.items():
        tracker.log_metrics(metrics, step)
    assert tracker.should_plot(50)
    tracker.log_weight_plots(50, *_weights_for_plots())
    curves = {"weight_mass_certain": ([10, 20, 30], [0.5, 0.6, 0.7]), "weight_mass_fork": ([10, 20, 30], [0.5, 0.4, 0.3])}
    tracker.log_curve_plot(30, "knowledge_weights", "knowledge", curves, reference={"share": ([10, 30], [0.4, 0.4])})
    tracker.log_curve_plot(50, "knowledge_weights", "knowledge", curves)  # replaces the file: one curve plot
    notes = tmp_path / "notes.txt"
    notes.write_text("hello artifact\n")
    tracker.log_artifact(notes, "extra")
    tracker.log_text("summary text", "summary/summary.txt")
    assert tracker.finish("FINISHED") is True
    assert tracker.stats.failed == 0 and tracker.stats.dropped == 0

    client = _client(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "round-trip"
    params = dict(run.data.params)
    note = params.pop("data.note")
    assert len(note) == 6000 and note.startswith("nnnn") and note.endswith("[truncated]")
    assert params == _expected_params()
    for key in ("loss", "weights/ess", "lr"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, key))
        assert history == [(step, pytest.approx(sent[step][key])) for step in sorted(sent)], key

    download = tmp_path / "download"
    download.mkdir()
    plots = sorted(a.path for a in client.list_artifacts(tracker.run_id, "plots"))
    assert plots == ["plots/knowledge_weights.png", "plots/weight_by_position_step0000050.png",
                     "plots/weight_hist_step0000050.png"]
    from matplotlib.image import imread

    for artifact in plots:
        local = Path(client.download_artifacts(tracker.run_id, artifact, str(download)))
        assert local.read_bytes()[:8] == PNG_MAGIC
        image = imread(local)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.01  # not a blank canvas
    config_local = Path(client.download_artifacts(tracker.run_id, "config/config.yaml", str(download)))
    assert yaml.safe_load(config_local.read_text()) == cfg
    assert Path(client.download_artifacts(tracker.run_id, "extra/notes.txt", str(download))).read_text() == "hello artifact\n"
    assert Path(client.download_artifacts(tracker.run_id, "summary/summary.txt", str(download))).read_text() == "summary text"


def test_embedded_store_round_trip_and_resume(store_dir, tmp_path, monkeypatch):
    """Default store (tracking_uri unset, no env): SQLite under ./mlruns, then a second Tracker resumes the run."""
    monkeypatch.chdir(store_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = TrackingConfig().resolved_uri()
    assert uri == f"sqlite:///{store_dir.resolve()}/mlruns/mlflow.db"
    run_dir = tmp_path / "run"
    _run_round_trip(None, run_dir, tmp_path)  # None: resolved from the cwd
    assert (store_dir / "mlruns" / "mlflow.db").is_file()
    artifacts = store_dir / "mlruns" / "artifacts"
    assert any(artifacts.rglob("weight_hist_step0000050.png")) and any(artifacts.rglob("config.yaml"))
    first_id = (run_dir / RUN_ID_FILE).read_text().strip()

    resumed = Tracker(TrackingConfig(finish_timeout_s=SETUP_BOUND_S), is_logging_rank=True)
    changed = _config()
    changed["train"]["steps"] = 400
    resumed.start(changed, yaml.safe_dump(changed), run_dir)
    assert resumed.flush(SETUP_BOUND_S)
    assert resumed.run_id == first_id and resumed.resumed
    assert "resumed" in resumed.describe() and f"mlflow ui --backend-store-uri {uri}" in resumed.describe()
    assert _client(uri).get_run(first_id).info.status == "RUNNING"
    resumed.log_metrics({"loss": 0.01}, 40)
    assert resumed.finish() is True
    client = _client(uri)
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in sorted(client.get_metric_history(first_id, "loss"), key=lambda m: m.step)] == [10, 20, 30, 40]
    assert run.data.params["train.steps"] == "200"  # params are write-once; the change is recorded beside
    assert run.data.tags["dcd.resume_changed_params"] == "train.steps"
    configs = [a.path for a in client.list_artifacts(first_id, "config")]
    assert "config/config.yaml" in configs and any(p.startswith("config/config.resume-") for p in configs)
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id], "attributes.run_name = 'round-trip'")] == [first_id]


def test_real_server_round_trip(mlflow_server_module, tmp_path):  # noqa: F811
    mlflow_server_module.start()  # no-op while it runs
    _run_round_trip(mlflow_server_module.uri, tmp_path / "run", tmp_path)


def test_server_dies_mid_run_training_goes_on(mlflow_server_module, tmp_path, caplog):  # noqa: F811
    server = mlflow_server_module
    server.start()  # no-op while it runs
    caplog.set_level(logging.WARNING, logger="dcd_megatron.tracking")
    # A generous timeout: a live server on busy cores may be slow; the dead one refuses at once.
    tracker = Tracker(TrackingConfig(tracking_uri=server.uri, timeout_s=60), is_logging_rank=True)
    tracker.start({"a": 1}, "a: 1\n", tmp_path / "run")
    assert tracker.flush(SETUP_BOUND_S)
    run_id = tracker.run_id
    assert run_id is not None
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": float(step)}, step)
    assert tracker.flush(SETUP_BOUND_S)

    server.stop()
    slowest = 0.0
    for step in (4, 5, 6):
        for call in (
            lambda: tracker.log_metrics({"loss": float(step)}, step),
            lambda: tracker.log_weight_plots(step, *_weights_for_plots()),
            lambda: tracker.log_text("while down", f"down/{step}.txt"),
        ):
            began = time.monotonic()
            call()
            slowest = max(slowest, time.monotonic() - began)
    assert slowest < CALL_BOUND_S
    tracker.flush(30)  # the queued calls now fail against the dead server
    assert tracker.stats.failed >= 3
    warnings = [r for r in caplog.records if "training continues" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING  # the rest are rate-limited, counted
    began = time.monotonic()
    assert tracker.finish("FINISHED") in (True, False)  # returns, never raises
    assert time.monotonic() - began < 30
    assert "logging calls failed" in caplog.records[-1].getMessage()

    client = _client(server.backend_uri)  # read what reached the server straight from its database
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == [(1, 1.0), (2, 2.0), (3, 3.0)]


class FlakyClient:
    """A stand-in MLflow client whose 'server' can be switched off and on."""

    def __init__(self, down: bool = False):
        self.down = down
        self.metrics: list[tuple[str, int, float]] = []
        self.params: dict[str, str] = {}
        self.status = None

    def _check(self):
        if self.down:
            raise ConnectionError("Connection refused")

    def get_experiment_by_name(self, name):
        self._check()
        return None

    def create_experiment(self, name, artifact_location=None):
        self._check()
        return "7"

    def create_run(self, experiment_id, run_name=None, tags=None):
        self._check()
        return SimpleNamespace(info=SimpleNamespace(run_id="run-1"))

    def get_run(self, run_id):
        self._check()
        return SimpleNamespace(data=SimpleNamespace(params=dict(self.params)))

    def log_batch(self, run_id, metrics=(), params=()):
        self._check()
        self.metrics += [(m.key, m.step, m.value) for m in metrics]
        self.params.update({p.key: p.value for p in params})

    def log_text(self, run_id, text, name):
        self._check()

    def set_terminated(self, run_id, status):
        self._check()
        self.status = status


def test_logging_resumes_when_the_server_comes_back(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dcd_megatron.tracking")
    fake = FlakyClient()
    tracker = Tracker(TrackingConfig(tracking_uri="http://fake"), is_logging_rank=True, client_factory=lambda uri: fake)
    tracker.start({"a": 1}, "a: 1\n", tmp_path / "run")
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.flush(10)
    fake.down = True
    tracker.log_metrics({"loss": 2.0}, 2)
    tracker.flush(10)
    fake.down = False
    tracker.log_metrics({"loss": 3.0}, 3)
    assert tracker.flush(10)
    assert tracker.finish() is True
    assert [step for _, step, _ in fake.metrics] == [1, 3] and fake.status == "FINISHED"
    messages = [r.getMessage() for r in caplog.records]
    assert any("training continues" in m for m in messages) and any("works again" in m for m in messages)


def test_run_is_created_once_the_server_appears(tmp_path):
    fake = FlakyClient(down=True)
    tracker = Tracker(TrackingConfig(tracking_uri="http://fake"), is_logging_rank=True, client_factory=lambda uri: fake)
    tracker.start({"a": {"b": 1}}, "a: 1\n", tmp_path / "run")
    assert tracker.run_id is None
    tracker.log_metrics({"loss": 1.0}, 1)  # skipped: no run yet
    tracker.flush(10)
    fake.down = False
    tracker.setup_retry_s = 0.0  # retry the setup on the next call instead of waiting 10 s
    tracker.log_metrics({"loss": 2.0}, 2)
    assert tracker.finish() is True
    assert tracker.run_id == "run-1" and (tmp_path / "run" / RUN_ID_FILE).read_text().strip() == "run-1"
    assert fake.params == {"a.b": "1"} and [step for _, step, _ in fake.metrics] == [2]


def test_unreachable_server_from_the_start_never_blocks(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dcd_megatron.tracking")
    tracker = Tracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", timeout_s=1), is_logging_rank=True)
    import mlflow  # noqa: F401  (start() imports it: a loaded machine takes minutes to, which is not blocking)

    began = time.monotonic()
    tracker.start({"a": 1}, "a: 1\n", tmp_path / "run")
    assert time.monotonic() - began < 30
    assert tracker.run_id is None and "not created yet" in tracker.describe()
    began = time.monotonic()
    for step in range(1, 20):
        tracker.log_metrics({"loss": 1.0}, step)
    assert time.monotonic() - began < CALL_BOUND_S
    tracker.finish("FAILED")
    assert not (tmp_path / "run" / RUN_ID_FILE).exists()
    assert any("unreachable" in r.getMessage() or "failed" in r.getMessage() for r in caplog.records)


def test_unusable_store_location_turns_tracking_off_with_a_warning(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    tracker = Tracker(TrackingConfig(tracking_uri=f"sqlite:///{blocker}/sub/mlflow.db"), is_logging_rank=True)
    tracker.start({"a": 1}, "a: 1\n", tmp_path / "run")
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.finish() is True
    assert "off for this run" in tracker.describe()
    assert any("tracking is off" in r.getMessage() for r in caplog.records)


def test_secrets_stay_out_of_params_artifacts_and_output(store_dir, tmp_path, monkeypatch, capsys, caplog):
    hf_token = "hf_TESTsecretTOKEN0123456789"
    env_password = "env-PASSWORD-4567"
    config_password = "config-pass-98765"
    uri_password = "uri-pass-24680"
    secrets = (hf_token, env_password, config_password, uri_password)
    monkeypatch.setenv("HF_TOKEN", hf_token)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", env_password)
    caplog.set_level(logging.DEBUG)
    uri = f"sqlite:///{store_dir / 'mlruns' / 'mlflow.db'}"
    cfg = {
        "data": {"hf_token": hf_token, "cache": f"/cache/{hf_token}/x"},
        "server": {"password": config_password, "user": "alice"},
        "launch": {"command": f"dcd-train --hf_token {hf_token} --password={config_password}"},
    }
    config_text = yaml.safe_dump(cfg)
    tracker = Tracker(TrackingConfig(tracking_uri=uri, finish_timeout_s=SETUP_BOUND_S), is_logging_rank=True)
    tracker.start(cfg, config_text, tmp_path / "run")
    assert tracker.flush(SETUP_BOUND_S)
    print(tracker.describe())
    tracker.log_text(f"token is {hf_token}, password {env_password}", "notes/leak.txt")
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text(config_text)
    tracker.log_artifact(leaky)
    tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.finish() is True
    assert leaky.read_text() == config_text  # the user's file is left alone

    # A server URI with a password in it, unreachable: describe() and the warnings must not show it.
    remote = Tracker(
        TrackingConfig(tracking_uri=f"http://alice:{uri_password}@127.0.0.1:{free_port()}", timeout_s=1),
        is_logging_rank=True,
    )
    remote.start(cfg, config_text, tmp_path / "run-remote")
    remote.log_metrics({"loss": 1.0}, 1)
    print(remote.describe())
    remote.finish("FAILED")

    client = _client(uri)
    run = client.get_run(tracker.run_id)
    stored = list(run.data.params.items()) + list(run.data.tags.items())
    download = tmp_path / "download"
    download.mkdir()
    texts = [p.read_text() for p in Path(client.download_artifacts(tracker.run_id, "", str(download))).rglob("*") if p.is_file()]
    assert len(texts) == 3 and any("alice" in t for t in texts)  # config, notes, leaky.yaml: still useful
    assert run.data.params["server.user"] == "alice" and run.data.params["data.hf_token"] == "***REDACTED***"
    captured = capsys.readouterr()
    outputs = [captured.out, captured.err, caplog.text]
    assert "alice" in captured.out  # the describe() lines did print
    for secret in secrets:
        for key, value in stored:
            assert secret not in value, (key, secret)
        for text in texts + outputs:
            assert secret not in text, secret


class CountingClient(FlakyClient):
    """Counts the metric requests (log_batch calls that carry metrics)."""

    def __init__(self):
        super().__init__()
        self.metric_calls = 0

    def log_batch(self, run_id, metrics=(), params=()):
        self.metric_calls += bool(metrics)
        super().log_batch(run_id, metrics=metrics, params=params)


@pytest.mark.parametrize("interval, min_calls, max_calls", [(60.0, 1, 2), (0.0, 30, 30)])
def test_step_metrics_are_sent_many_steps_a_request_at_most_every_flush_interval(tmp_path, interval, min_calls,
                                                                                   max_calls):
    fake = CountingClient()
    tracker = Tracker(TrackingConfig(tracking_uri="http://fake", metrics_flush_s=interval), is_logging_rank=True,
                      client_factory=lambda uri: fake)
    tracker.start({"a": 1}, "a: 1\n", tmp_path / "run")
    for step in range(1, 31):
        tracker.log_metrics({"loss": float(step), "ce": 1.0}, step)
        if not interval:  # interval 0 sends each step at once: wait for it (a loaded machine is slow, not wrong)
            deadline = time.monotonic() + 30
            while step not in {s for _, s, _ in fake.metrics} and time.monotonic() < deadline:
                time.sleep(0.005)
    if interval:  # the first step went out alone; the rest wait for the interval (or finish)
        assert fake.metric_calls <= 1
    assert tracker.finish() is True  # finish sends what is buffered: nothing is lost
    assert sorted({s for _, s, _ in fake.metrics}) == list(range(1, 31)) and len(fake.metrics) == 60
    assert min_calls <= fake.metric_calls <= max_calls


def test_metrics_flush_interval_is_validated():
    with pytest.raises(ValueError, match="metrics_flush_s"):
        TrackingConfig(metrics_flush_s=-1)
