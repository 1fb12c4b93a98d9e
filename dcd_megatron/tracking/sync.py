"""Bring a run's MLflow record up to date after the fact (``dcd-train --sync-tracking OUTPUT_DIR``).

A tracking server that was down during training (or at its end) leaves the MLflow run RUNNING
with the steps it got. This replays from OUTPUT_DIR/metrics.jsonl every value the run lacks
(asking the store what it has, so a second sync sends nothing) and sets the status the run
really ended with, from final_metrics.json. Idempotent; safe to run on any finished or crashed run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dcd_megatron.errors import UserError
from dcd_megatron.tracking.config import TrackingConfig
from dcd_megatron.tracking.record import read_record, replay_missing, run_end, values_by_key
from dcd_megatron.tracking.redact import REDACTED, redact_text, redact_uri
from dcd_megatron.tracking.telemetry import telemetry_off
from dcd_megatron.tracking.params import MAX_PARAMS_PER_BATCH, batched
from dcd_megatron.tracking.tracker import (
    CONFIG_ARTIFACT, PENDING_RUN_FILE, RUN_ID_FILE, TRACKING_URI_FILE, apply_http_timeouts, quiet_mlflow_urls,
)

RECORD_FILE = "metrics.jsonl"
FINAL_FILE = "final_metrics.json"


class SyncError(UserError, ValueError):
    """The run cannot be synced (no run recorded, store unreachable, run not in it): a one-line reason and fix."""


@dataclass
class SyncResult:
    """What a sync did."""

    run_id: str
    tracking_uri: str  # redacted
    sent: int  # metric values replayed from metrics.jsonl
    status: str  # the MLflow status the run now has
    tags: dict[str, str] = field(default_factory=dict)
    status_changed: bool = True

    def line(self) -> str:
        how = "set to" if self.status_changed else "already"
        why = "; ".join(f"{k}={v}" for k, v in self.tags.items())
        return (f"MLflow run {self.run_id} at {self.tracking_uri}: sent {self.sent} missing metric values from "
                f"{RECORD_FILE}; status {how} {self.status}" + (f" ({why})" if why else ""))


def resolve_sync_uri(output_dir: Path, explicit: str | None, env: dict | None = None) -> str:
    """The store of the run: ``explicit``, else the one recorded at the run's start (unless its
    password was redacted), else ``MLFLOW_TRACKING_URI``, else the default ``./mlruns/mlflow.db``."""
    import os

    env = os.environ if env is None else env
    if explicit:
        return explicit
    recorded_file = output_dir / TRACKING_URI_FILE
    recorded = recorded_file.read_text().strip() if recorded_file.is_file() else ""
    if recorded and REDACTED not in recorded:
        return recorded
    if env.get("MLFLOW_TRACKING_URI", "").strip():
        return env["MLFLOW_TRACKING_URI"].strip()
    if recorded:
        raise SyncError(f"{recorded_file} names {recorded}, whose password is not stored; pass "
                        "tracking.tracking_uri=URI (or set MLFLOW_TRACKING_URI) with the password")
    return TrackingConfig().resolved_uri()


def _read_final(output_dir: Path, last_step: int | None) -> dict | None:
    """final_metrics.json, or None when the last process ended without writing it (none, torn, or
    older than the last recorded step: a resumed process died after it)."""
    path = output_dir / FINAL_FILE
    try:
        final = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(final, dict):
        return None
    if last_step is not None and int(final.get("step", 0) or 0) < last_step:
        return None
    return final


def sync_run(output_dir: str | Path, tracking_uri: str | None = None, timeout_s: float = 30.0) -> SyncResult:
    """Replay what the MLflow run of ``output_dir`` lacks and set its real status; SyncError says why not."""
    out = Path(output_dir)
    id_file = out / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id and not (out / PENDING_RUN_FILE).is_file():
        raise SyncError(f"{out} has no {RUN_ID_FILE}: no MLflow run was created for it (tracking was off); "
                        "nothing to sync")
    uri = resolve_sync_uri(out, tracking_uri)
    shown = redact_uri(uri)
    telemetry_off()
    apply_http_timeouts(timeout_s)
    quiet_mlflow_urls()
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        run_id = run_id or _create_pending_run(client, out)
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise SyncError(f"run {run_id} (from {id_file}) is not in {shown}; pass the store it was logged to "
                            "as tracking.tracking_uri=URI") from None
        if "API request to" in str(exc):  # the HTTP client's wrapper of a refused / timed-out connection
            raise SyncError(f"cannot reach the MLflow store at {shown}; try again when it answers, or pass "
                            "tracking.tracking_uri=URI") from None
        raise SyncError(f"the MLflow store at {shown} refused the run {run_id}: {redact_text(str(exc))[:300]}; try again when it answers") from None
    except Exception as exc:  # connection refused, timeouts, DNS: the store is not there
        raise SyncError(f"cannot reach the MLflow store at {shown} ({type(exc).__name__}); try again when it "
                        "answers, or pass tracking.tracking_uri=URI") from None
    records = list(read_record(out / RECORD_FILE))
    last_step = max((r["step"] for r in records), default=None)
    status, tags = run_end(_read_final(out, last_step), last_step)
    try:
        sent = replay_missing(client, run_id, values_by_key(records))
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        changed = run.info.status != status
        if changed:
            client.set_terminated(run_id, status=status)
    except Exception as exc:
        raise SyncError(f"the MLflow store at {shown} failed during the sync ({type(exc).__name__}: {redact_text(str(exc))[:300]}); "
                        "run it again when the store answers (nothing is sent twice)") from None
    return SyncResult(run_id, shown, sent, status, tags, changed)


def _create_pending_run(client, out: Path) -> str:
    """Create the run a training whose store never answered would have had (PENDING_RUN_FILE): its
    experiment, name, params and config; record its id as the training would have. Its id."""
    from mlflow.entities import Param

    pending = json.loads((out / PENDING_RUN_FILE).read_text())
    experiment = client.get_experiment_by_name(pending["experiment"])
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(pending["experiment"])
    run = client.create_run(experiment_id, run_name=pending.get("run_name"), tags={"dcd.run_dir": pending["run_dir"]})
    run_id = run.info.run_id
    for chunk in batched(list(pending["params"].items()), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in chunk])
    client.log_text(run_id, pending["config"], CONFIG_ARTIFACT)
    tmp = out / (RUN_ID_FILE + ".tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(out / RUN_ID_FILE)
    (out / PENDING_RUN_FILE).unlink()
    return run_id

