"""The run's local record of metrics (JSON lines ``{"step": N, key: value, ...}``: metrics.jsonl)
and what the tracker does with it: cut it back to a checkpoint on resume, and replay into MLflow
the values a dead server missed, without sending anything the store already has.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dcd_megatron.tracking.params import MAX_METRICS_PER_BATCH, batched, safe_key

# final_metrics.json "status" -> MLflow run status (MLflow has no STOPPED: a stopped run did not
# finish its planned steps, so it is KILLED, with the tags below saying why and where).
MLFLOW_STATUS = {"FINISHED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED", "STOPPED": "KILLED"}
STOP_REASON_TAG = "dcd.stop_reason"
STOPPED_AT_TAG = "dcd.stopped_at_step"
END_REASON_TAG = "dcd.end_reason"
END_TAGS = (STOP_REASON_TAG, STOPPED_AT_TAG, END_REASON_TAG)  # cleared when the run resumes


def read_record(path: Path) -> Iterator[dict]:
    """The records of ``path`` in order; lines that are not a JSON object with an integer step
    (a line torn by a kill) are skipped."""
    path = Path(path)
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
                record["step"] = int(record["step"])
            except (ValueError, KeyError, TypeError):
                continue
            yield record


def truncate_record(path: Path, keep_up_to: int) -> int:
    """Drop the records past step ``keep_up_to`` (the steps a resumed run repeats), atomically;
    returns how many lines were dropped (torn lines count too)."""
    path = Path(path)
    if not path.is_file():
        return 0

    def kept(line: str) -> bool:
        try:
            return int(json.loads(line)["step"]) <= keep_up_to
        except (ValueError, KeyError, TypeError):
            return False

    with open(path, encoding="utf-8") as fh:
        dropped = sum(1 for line in fh if line.strip() and not kept(line))
    if dropped:  # a second pass streams the rest into a new file: a long run's record is never all in memory
        tmp = path.with_name(path.name + ".tmp")
        with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as dst:
            dst.writelines(line if line.endswith("\n") else line + "\n" for line in src if kept(line))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    return dropped


def values_by_key(records: Iterable[dict], before_step: int | None = None,
                  from_step: int = 0) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` of the numeric values of ``records`` at steps ``from_step`` to
    ``before_step`` (excluded; None: no end); a later record of a step replaces an earlier one."""
    out: dict[str, dict[int, float]] = {}
    for record in records:
        step = record["step"]
        if step < from_step or (before_step is not None and step >= before_step):
            continue
        for key, value in record.items():
            if key == "step" or isinstance(value, (str, list, dict)) or value is None:
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            out.setdefault(safe_key(key), {})[step] = number
    return out


def stored_steps(client: Any, run_id: str, key: str) -> set[int]:
    """The steps at which the run already has a value of ``key``."""
    return {int(m.step) for m in client.get_metric_history(run_id, key)}


def replay_missing(client: Any, run_id: str, wanted: dict[str, dict[int, float]]) -> int:
    """Log every (metric, step) of ``wanted`` the run lacks (one history query per metric, so
    replaying twice sends nothing twice); returns how many values were sent. Their timestamp is now."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    missing = []
    for key, by_step in wanted.items():
        have = stored_steps(client, run_id, key)
        missing += [Metric(key, value, now, step) for step, value in sorted(by_step.items()) if step not in have]
    for chunk in batched(missing, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=list(chunk))
    return len(missing)


def run_end(final: dict | None, last_step: int | None = None) -> tuple[str, dict[str, str]]:
    """The MLflow status and tags that say how a run ended, from its final_metrics.json
    (``None``: the process ended without writing it, so it was killed or crashed)."""
    if final is None:
        where = "no step recorded" if last_step is None else f"last recorded step {last_step}"
        reason = f"the training process ended without writing final_metrics.json (killed or crashed; {where})"
        return "FAILED", {END_REASON_TAG: reason}
    status = str(final.get("status", "FAILED"))
    tags = {}
    if status == "STOPPED":
        tags = {STOP_REASON_TAG: str(final.get("stop_reason", "")), STOPPED_AT_TAG: str(final.get("stopped_at_step", ""))}
    return MLFLOW_STATUS.get(status, "FAILED"), tags
