"""Fast checks of the tracking pieces that need no MLflow store: redaction, params, config, worker, console."""

from __future__ import annotations

import threading
import time

import pytest

from dcd_megatron.tracking import ProgressPrinter, Tracker, TrackingConfig, flatten_params, looks_secret, redact
from dcd_megatron.tracking.params import MAX_PARAM_VALUE_CHARS, batched, param_value, safe_key
from dcd_megatron.tracking.progress import format_duration, format_sci
from dcd_megatron.tracking.redact import REDACTED, redact_text, redact_uri, secret_env_values
from dcd_megatron.tracking.tracker import apply_http_timeouts, default_is_logging_rank
from dcd_megatron.tracking.worker import BackgroundWorker

ENV = {"HF_TOKEN": "hf_SeCrEtVaLuE123", "WANDB_API_KEY": "wandb-key-987654", "HOME": "/root", "USE_AUTH": "1"}


# ---------------------------------------------------------------- redaction
@pytest.mark.parametrize(
    "name", ["HF_TOKEN", "hf_token", "WANDB_API_KEY", "apiKey", "MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY",
             "db_passwd", "private_key", "client_secret", "GOOGLE_APPLICATION_CREDENTIALS", "auth"]
)  # fmt: skip
def test_secret_names_are_recognised(name):
    assert looks_secret(name)


@pytest.mark.parametrize(
    "name", ["tokenizer", "max_tokens", "num_tokens", "tokens_per_s", "TOKENIZERS_PARALLELISM", "author", "PWD", "lr", "keyword",
             "certain_token_frac"]
)
def test_ordinary_names_are_not_secret(name):
    assert not looks_secret(name)


def test_secret_env_values_skip_flags_and_short_values():
    values = secret_env_values(ENV)
    assert set(values) == {"hf_SeCrEtVaLuE123", "wandb-key-987654"}  # USE_AUTH=1 is a flag, HOME not secret


def test_redact_nested_config():
    cfg = {
        "data": {"hf_token": "abc", "tokenizer": "/models/tok", "path": "/data/hf_SeCrEtVaLuE123/x.jsonl"},
        "auth": {"user": "bob", "password": "hunter22"},
        "keys": ["wandb-key-987654", 3],
        "empty_token": None,
        "use_auth": True,
        "train": {"steps": 10, "lr": 3e-4},
        "uri": "http://bob:pw-in-uri@host:5000/x",
    }
    out = redact(cfg, env=ENV)
    assert out["data"] == {"hf_token": REDACTED, "tokenizer": "/models/tok", "path": f"/data/{REDACTED}/x.jsonl"}
    assert out["auth"] == {"user": "bob", "password": REDACTED}
    assert out["keys"] == [REDACTED, 3]
    assert out["empty_token"] is None and out["use_auth"] is True
    assert out["train"] == {"steps": 10, "lr": 3e-4}
    assert out["uri"] == f"http://bob:{REDACTED}@host:5000/x"
    assert cfg["data"]["hf_token"] == "abc"  # input left alone


def test_redact_text_yaml_json_and_command_lines():
    text = (
        "data:\n  hf_token: abc123\n  tokenizer: /tok\n  token: null\nmodel:\n  max_tokens: 100\n"
        'extra: {"api_key": "k-1", "n": 3}\n'
        "cmd: python train.py --hf_token=xyz --steps=3 MY_PASSWORD=pw42 url=http://h/x?token=qq&b=2\n"
        "cli: dcd-train --api-key spacedkey1 --steps 5 -v\n"
        "tracking_uri: https://u:uripass@mlflow.example\n"
        "note: uses hf_SeCrEtVaLuE123 somewhere\n"
    )
    out = redact_text(text, env=ENV)
    for secret in ("abc123", "k-1", "xyz", "pw42", "qq", "uripass", "hf_SeCrEtVaLuE123", "spacedkey1"):
        assert secret not in out, secret
    for kept in ("tokenizer: /tok", "token: null", "max_tokens: 100", '"n": 3', "--steps=3", "&b=2", "u:", "--steps 5 -v"):
        assert kept in out, kept


def test_redact_uri_keeps_user_and_host():
    assert redact_uri("https://alice:s3cret@mlflow.corp:443/x") == f"https://alice:{REDACTED}@mlflow.corp:443/x"
    assert redact_uri("sqlite:////tmp/mlruns/mlflow.db") == "sqlite:////tmp/mlruns/mlflow.db"


# ---------------------------------------------------------------- params
def test_flatten_params_dotted_keys_and_string_values():
    cfg = {"model": {"hidden": 64, "rope": True, "spec": {"kind": "local"}}, "lr": 3e-4, "tags": [1, "a"], "none": None, "empty": {}}
    assert flatten_params(cfg) == {
        "model.hidden": "64",
        "model.rope": "True",
        "model.spec.kind": "local",
        "lr": "0.0003",
        "tags": '[1,"a"]',
        "none": "None",
        "empty": "{}",
    }


def test_param_value_truncated_to_mlflow_limit():
    value = param_value("x" * (MAX_PARAM_VALUE_CHARS + 500))
    assert len(value) == MAX_PARAM_VALUE_CHARS and value.endswith("[truncated]")


def test_safe_key_and_batching():
    assert safe_key("loss[0]:weighted") == "loss_0__weighted"
    assert [len(b) for b in batched(list(range(250)), 100)] == [100, 100, 50]
    with pytest.raises(ValueError, match="batch size"):
        list(batched([1], 0))


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    "field,value",
    [("enabled", "yes"), ("tracking_uri", " "), ("experiment", ""), ("run_name", 3), ("plot_interval", -1),
     ("timeout_s", 0), ("finish_timeout_s", -2), ("max_pending", 0)],
)  # fmt: skip
def test_tracking_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"tracking.{field}"):
        TrackingConfig(**{field: value})


def test_resolved_uri_prefers_setting_then_env_then_cwd(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert TrackingConfig().resolved_uri(cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert TrackingConfig().resolved_uri(cwd=tmp_path) == "http://server:5000"
    assert TrackingConfig(tracking_uri="sqlite:///x.db").resolved_uri() == "sqlite:///x.db"


def test_http_timeouts_set_without_clobbering_user_choices(monkeypatch):
    import os

    for key in ("TIMEOUT", "MAX_RETRIES", "BACKOFF_FACTOR"):  # restored after the test
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{key}", raising=False)
    monkeypatch.delenv("MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")

    applied = apply_http_timeouts(2.5)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in applied and "MLFLOW_HTTP_REQUEST_TIMEOUT" in applied
    apply_http_timeouts(60)  # a later tracker may change what an earlier one set ...
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "17")
    apply_http_timeouts(5)  # ... but not what the user set
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "17"


# ---------------------------------------------------------------- no-op tracker
def test_tracker_on_other_ranks_does_nothing(tmp_path):
    tracker = Tracker(TrackingConfig(tracking_uri="http://127.0.0.1:9"), is_logging_rank=False)
    tracker.start({"a": 1}, "a: 1\n", tmp_path / "run")
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.log_weight_plots(1, [0, 1], [3], [0, 1], [1.0])
    tracker.log_text("x", "x.txt")
    assert tracker.finish() is True
    assert not (tmp_path / "run").exists() and tracker.run_id is None
    assert "not on this rank" in tracker.describe()
    assert not tracker.should_plot(50)
    assert "off" in Tracker(TrackingConfig(enabled=False), is_logging_rank=True).describe()


def test_single_process_is_the_logging_rank():
    assert default_is_logging_rank() is True  # no process group: this process logs


def test_should_plot_follows_interval():
    tracker = Tracker(TrackingConfig(plot_interval=25), is_logging_rank=True)
    assert [s for s in range(0, 101) if tracker.should_plot(s)] == [25, 50, 75, 100]
    assert not any(Tracker(TrackingConfig(plot_interval=0), is_logging_rank=True).should_plot(s) for s in range(1, 60))


# ---------------------------------------------------------------- background worker
def test_worker_drops_oldest_when_full_keeps_essential_and_survives_errors():
    gate = threading.Event()
    ran, errors = [], []
    worker = BackgroundWorker(max_pending=3, on_error=lambda name, exc: errors.append((name, str(exc))))
    started = threading.Event()
    worker.submit("blocker", lambda: (started.set(), gate.wait()))
    assert started.wait(30)  # the worker holds the blocker; from now on the queue itself holds 3
    worker.submit("setup", lambda: ran.append("setup"), essential=True)
    for i in range(5):
        worker.submit(f"m{i}", lambda i=i: ran.append(f"m{i}"))
    worker.submit("boom", lambda: 1 / 0)
    worker.submit("after", lambda: ran.append("after"))
    assert worker.flush(0.3) is False  # still blocked: flush gives up on time
    gate.set()
    assert worker.flush(10) is True
    # queue of 3 behind the blocker: every m_i was pushed out by a newer call; "setup" is essential
    assert ran == ["setup", "after"]
    assert errors == [("boom", "division by zero")]
    stats = worker.stats
    assert (stats.dropped, stats.failed, stats.done, stats.pending) == (5, 1, 3, 0)
    assert worker.close(1.0) is True
    assert worker.submit("late", lambda: None) is False


def test_worker_reports_failures_and_continues():
    errors, ran = [], []
    worker = BackgroundWorker(max_pending=10, on_error=lambda name, exc: errors.append(name))
    worker.submit("bad", lambda: (_ for _ in ()).throw(ConnectionError("down")))
    worker.submit("good", lambda: ran.append(1))
    assert worker.close(10) is True
    assert errors == ["bad"] and ran == [1]
    assert worker.stats.failed == 1 and worker.stats.done == 1


# ---------------------------------------------------------------- console line
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_line_format_and_eta():
    clock = FakeClock()
    printer = ProgressPrinter(total_steps=200, log_interval=20, start_step=0, clock=clock)
    clock.t = 40.0  # 20 steps in 40 s -> 2 s/step -> 180 steps left = 360 s
    metrics = {"loss": 1.23454, "ce": 1.30012, "ess": 0.931, "lr": 2e-4, "grad_norm": 0.8123, "tokens_per_s": 1234.4}
    assert printer.line(20, metrics) == (
        "step 20/200 | loss 1.2345 (sft 1.3001) | ess 0.93 | lr 2.0e-4 | gnorm 0.81 | 1234 tok/s | eta 6m00s"
    )


def test_progress_eta_is_a_moving_average_over_the_window():
    clock = FakeClock()
    printer = ProgressPrinter(total_steps=100, log_interval=10, window=2, clock=clock)
    for step, t in ((10, 10.0), (20, 20.0), (30, 80.0)):
        clock.t = t
        line = printer.line(step, {"loss": 1.0})
    # window=2 keeps the marks at steps 10, 20, 30: (80 - 10) / 20 = 3.5 s/step, 70 steps left
    assert printer.seconds_per_step() == pytest.approx(3.5)
    assert line.endswith("eta " + format_duration(3.5 * 70))
    assert printer.line(30, {}) == "step 30/100 | eta 4m05s"  # missing metrics are left out


def test_progress_print_and_should_print(capsys):
    printer = ProgressPrinter(total_steps=45, log_interval=20, clock=FakeClock())
    assert [s for s in range(1, 46) if printer.should_print(s)] == [20, 40, 45]
    text = printer.print(20, {"loss": 2.0})
    assert capsys.readouterr().out == text + "\n"
    with pytest.raises(ValueError, match="log_interval"):
        ProgressPrinter(10, 0)


def test_duration_and_sci_formatting():
    assert [format_duration(s) for s in (0, 59, 83, 3600, 7500, 200000)] == ["0s", "59s", "1m23s", "1h00m", "2h05m", "2d07h"]
    assert format_duration(float("nan")) == "?" and format_duration(None) == "?"
    assert (format_sci(2e-4), format_sci(1.5e-5), format_sci(3.0)) == ("2.0e-4", "1.5e-5", "3.0e0")


def test_histogram_plot_trims_empty_end_bins_and_checks_shapes():
    import numpy as np

    from dcd_megatron.tracking.plots import check_binned, trim_empty_bins

    edges = np.array([0.0, 1, 2, 3, 4, 5, 6])
    counts = np.array([0.0, 0, 4, 0, 2, 0])
    e, c = trim_empty_bins(edges, counts)
    assert e.tolist() == [1, 2, 3, 4, 5, 6] and c.tolist() == [0, 4, 0, 2, 0]  # one empty bin of margin each side
    assert trim_empty_bins(edges, np.zeros(6))[1].size == 6
    with pytest.raises(ValueError, match="n\\+1 bin edges"):
        check_binned(edges, counts[:3], "hist_edges", "hist_counts")
    with pytest.raises(ValueError, match="strictly increasing"):
        check_binned(edges[::-1], counts, "hist_edges", "hist_counts")


def test_metric_history_keeps_finite_values_and_resumes_from_metrics_jsonl(tmp_path):
    import json

    from dcd_megatron.tracking import MetricHistory

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "a": 0.5, "b": 2.0}, {"step": 2, "a": 0.6}, {"step": 3, "a": 0.9},  # 3: a killed run's
             {"step": 2, "val_loss": 1.0}, {"step": 3, "a": 0.7}]  # a validation record; the resumed step 3
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + "not json\n")
    history = MetricHistory(["a", "b", "c"])
    history.load_jsonl(path, up_to_step=2)
    history.add(3, {"a": 0.8, "b": float("nan"), "c": "text"})
    assert history.curves() == {"a": ([1, 2, 3], [0.5, 0.6, 0.8]), "b": ([1], [2.0])}
    assert history.curves(["b"]) == {"b": ([1], [2.0])}
    resumed = MetricHistory(["a"])
    resumed.load_jsonl(path, up_to_step=10)
    assert resumed.curves() == {"a": ([1, 2, 3], [0.5, 0.6, 0.7])}  # the later record of step 3 wins
    MetricHistory(["a"]).load_jsonl(tmp_path / "missing.jsonl", 5)


def test_curve_plot_checks_its_input_and_renders(tmp_path):
    from matplotlib.image import imread

    from dcd_megatron.tracking.plots import check_curves, render_metric_curves

    with pytest.raises(ValueError, match="one value a step"):
        check_curves({"a": ([1, 2], [0.5])})
    with pytest.raises(ValueError, match="curves is empty"):
        check_curves({})
    with pytest.raises(ValueError, match=r"curves\['a'\] steps"):
        check_curves({"a": ([], [])})
    curves = check_curves({"a": ([1, 2, 3], [0.2, 0.4, 0.5]), "b": ([1, 2, 3], [0.8, 0.6, 0.5])})
    png = render_metric_curves(tmp_path / "c.png", 3, "title", curves, check_curves({"ref": ([1, 3], [0.3, 0.3])}))
    image = imread(png)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.01
