"""Issue 24, item 2: one redaction for everything that leaves the process.

Secrets planted in the environment (``HF_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``, an API key), in the
tracking URI's ``user:password@`` and inside a config value (a run name holding HF_TOKEN's value)
reach no file the run writes, nothing it prints (MLflow's own "View run" lines included), no MLflow
param or tag, no lock file and no "in use" message. One short training run against a real MLflow
server on loopback; the rest are unit checks.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dcd_megatron.configs.train import TrainConfig
from dcd_megatron.runtime import output_lock as ol
from dcd_megatron.tracking.redact import REDACTED, redacted_console
from dcd_megatron.train.resume import compare
from tests.mlflow_server import mlflow_server  # noqa: F401  (pytest fixture)
from tests.train_helpers import run_train, train_env

HF_TOKEN = "hf_PLANTEDtoken0123456789"
ENV_PASSWORD = "PLANTED-env-pass-24680"
API_KEY = "PLANTED-api-key-97531"
URI_PASSWORD = "PLANTEDuripass13579"
SECRETS = (HF_TOKEN, ENV_PASSWORD, API_KEY, URI_PASSWORD)


@pytest.fixture
def planted_env(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ENV_PASSWORD)
    monkeypatch.setenv("SOME_SERVICE_API_KEY", API_KEY)


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def test_the_lock_file_and_the_in_use_message_are_redacted(tmp_path, planted_env):
    command = f"dcd-train tracking.tracking_uri=http://alice:{URI_PASSWORD}@host:5000 tracking.run_name=x-{HF_TOKEN}"
    with ol.acquire(tmp_path / "run", command=command):
        text = (tmp_path / "run" / ol.LOCK_NAME).read_text()
        assert "alice:" + REDACTED in text and not _leaks(text), text
    # a lock written in clear (an older version) is still named redacted
    proc = subprocess.Popen(["sleep", "60"])
    try:
        record = dict(ol.owner_record(), pid=proc.pid, pid_start=(ol._proc_stat(proc.pid) or (None, None))[1],
                      command=command, token="theirs")
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / ol.LOCK_NAME).write_text(json.dumps(record))
        with pytest.raises(ol.OutputDirBusyError) as err:
            ol.acquire(tmp_path / "other")
    finally:
        proc.kill()
        proc.wait()
    assert "is in use" in str(err.value) and not _leaks(str(err.value)), str(err.value)


def test_the_console_is_redacted_whoever_writes(planted_env, monkeypatch):
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with redacted_console():
        print(f"View run x-{HF_TOKEN} at: http://alice:{URI_PASSWORD}@127.0.0.1:5000/#/runs/1")
        sys.stderr.write(f"key {API_KEY}\n")
    assert sys.stdout is out and sys.stderr is err  # restored
    assert not _leaks(out.getvalue() + err.getvalue()) and "View run x-" + REDACTED in out.getvalue()


def test_a_resume_compares_redacted_configs(planted_env):
    ours = TrainConfig()
    ours.tracking.tracking_uri = f"http://alice:{URI_PASSWORD}@host:5000"
    ours.tracking.run_name = f"x-{HF_TOKEN}"
    theirs = TrainConfig()
    theirs.tracking.tracking_uri = f"http://alice:{REDACTED}@host:5000"  # as meta.json holds it
    theirs.tracking.run_name = f"x-{REDACTED}"
    check = compare(ours, theirs)
    assert check.free == [] and check.by_group == {}  # not a change, and never printed in clear


def test_no_secret_reaches_a_file_the_console_or_mlflow(tmp_path, mlflow_server, planted_env):  # noqa: F811
    """One tiny run (2 steps, a checkpoint) against a real server reached through a URI with a password."""
    from mlflow.tracking import MlflowClient

    host = mlflow_server.uri.removeprefix("http://")
    uri = f"http://alice:{URI_PASSWORD}@{host}"
    out = tmp_path / "run"
    env = train_env(tmp_path)
    proc = run_train(out, ["train.steps=2", "train.save_interval=2", "train.log_interval=1",
                           f"tracking.tracking_uri={uri}", f"tracking.run_name=exp-{HF_TOKEN}"], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "View run" not in proc.stdout  # MLflow's own lines (they print the URI as given) are silenced
    assert f"alice:{REDACTED}@{host}" in proc.stdout  # our own line says where the run is
    assert not _leaks(proc.stdout), proc.stdout[-3000:]

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "meta.json" for p in written) and any(p.name == "mlflow_run_id" for p in written)
    for path in written:
        data = path.read_bytes()
        assert not [s for s in SECRETS if s.encode() in data], path

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    stored = {**run.data.params, **run.data.tags, "run_name": run.info.run_name}
    assert stored["tracking.tracking_uri"] == f"http://alice:{REDACTED}@{host}"
    assert not [k for k, v in stored.items() if _leaks(str(v))], stored


@pytest.mark.parametrize("command", ["dcd-eval", "dcd-score", "dcd-convert"])
def test_every_command_redacts_its_one_line_error(tmp_path, planted_env, capsys, command):
    """A path holding a secret's value (a user's typo, say) is named in the error, redacted."""
    from dcd_megatron.cli import convert, score
    from dcd_megatron.eval import cli as eval_cli

    missing = tmp_path / f"nothing-{HF_TOKEN}"
    argv = {
        "dcd-eval": (eval_cli.main, ["--checkpoint", str(missing), "--benchmark", f"gsm8k={missing}.jsonl",
                                     "--output-dir", str(tmp_path / "eval")]),
        "dcd-score": (score.main, ["--teacher", str(missing), "--data", str(missing), "--out", str(tmp_path / "s"),
                                   "--recipe", "tiny_cpu", "--no-progress"]),
        "dcd-convert": (convert.main, ["mcore-to-hf", "--checkpoint", str(missing), "--out", str(tmp_path / "hf")]),
    }
    main, args = argv[command]
    assert main(args) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    assert f"{command}: error" in text and f"nothing-{REDACTED}" in text and not _leaks(text), text
