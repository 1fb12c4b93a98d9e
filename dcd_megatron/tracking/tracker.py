"""The MLflow tracker the trainer calls unconditionally: real on the logging rank, a no-op elsewhere.

Every MLflow call runs on a background worker (``worker.py``) so a slow or dead server never
blocks a training step; failures are counted and warned about (rate-limited), never raised.
The run id lives in ``run_dir/mlflow_run_id`` so a resumed training continues the same run.
Given the run's local record (metrics.jsonl), the tracker replays what a dead server missed as
soon as it answers again, and at the end (``record.py``); ``sync.py`` does the same afterwards.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dcd_megatron.tracking.config import TrackingConfig, default_artifact_location, sqlite_path
from dcd_megatron.tracking.intervals import due
from dcd_megatron.tracking.params import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    batched,
    flatten_params,
    safe_key,
)
from dcd_megatron.tracking.plots import (
    as_float_array,
    check_binned,
    check_curves,
    render_metric_curves,
    render_weight_by_position,
    render_weight_histogram,
)
from dcd_megatron.tracking.record import END_TAGS, read_record, replay_missing, stored_steps, values_by_key
from dcd_megatron.tracking.redact import redact, redact_text, redact_uri
from dcd_megatron.tracking.telemetry import telemetry_off
from dcd_megatron.tracking.worker import BackgroundWorker, WorkerStats

logger = logging.getLogger("dcd_megatron.tracking")

RUN_ID_FILE = "mlflow_run_id"
PENDING_RUN_FILE = "mlflow_pending_run.json"  # the run to create later: the store never answered (redacted)
TRACKING_URI_FILE = "mlflow_tracking_uri"  # where the run is (password redacted), for dcd-train --sync-tracking
CONFIG_ARTIFACT = "config/config.yaml"
FINISH_STATUSES = ("FINISHED", "FAILED", "KILLED")
# After the first warning, at most one warning per this many seconds (with a count of the rest).
WARN_INTERVAL_S = 60.0
_TEXT_ARTIFACT_MAX_BYTES = 20 * 2**20


class RunUnavailable(RuntimeError):
    """The MLflow run could not be created or reached yet; the call is skipped, not retried."""


def default_is_logging_rank() -> bool:
    """Global rank 0 logs, as in dcd-train (every rank gets the last pipeline stage's metrics)."""
    torch = sys.modules.get("torch")  # no torch imported: no process group can exist
    if torch is None:
        return True
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


# What apply_http_timeouts put into the environment, so a later Tracker may change its own values
# (but never a value the user set).
_APPLIED_ENV: dict[str, str] = {}


def quiet_mlflow_urls(env: dict | None = None) -> None:
    """Silence MLflow's own "View run ... at: URL" lines: they print the tracking URI as given, password
    included; dcd-train prints its own line with the password redacted (`Tracker.describe`)."""
    (os.environ if env is None else env)["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def apply_http_timeouts(timeout_s: float, env: dict | None = None) -> dict[str, str]:
    """Make MLflow's HTTP calls give up after ``timeout_s`` with one retry, unless the user set them."""
    env = os.environ if env is None else env
    seconds = str(max(1, math.ceil(timeout_s)))
    wanted = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": seconds,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT": seconds,
    }
    applied = {}
    for key, value in wanted.items():
        ours = key in _APPLIED_ENV and env.get(key) == _APPLIED_ENV[key]
        if key not in env or ours:
            env[key] = value
            applied[key] = value
    if env is os.environ:
        _APPLIED_ENV.update(applied)
    return applied


class Tracker:
    """One per process. ``Tracker(cfg, is_logging_rank=rank == 0)``; all methods are safe to call anywhere."""

    def __init__(
        self,
        config: TrackingConfig | None = None,
        *,
        is_logging_rank: bool | None = None,
        client_factory: Callable[[str], Any] | None = None,
    ):
        """``is_logging_rank`` None: global rank 0 (see ``default_is_logging_rank``).
        ``client_factory(uri)`` builds the MLflow client (default ``MlflowClient``; tests pass fakes)."""
        self.config = config if config is not None else TrackingConfig()
        self._client_factory = client_factory
        # While the run is not set up, retry creating it at most this often (calls in between are skipped).
        self.setup_retry_s = max(10.0, 2 * self.config.timeout_s)
        if is_logging_rank is None:
            is_logging_rank = default_is_logging_rank()
        self.is_logging_rank = bool(is_logging_rank)
        self.active = self.config.enabled and self.is_logging_rank
        self.tracking_uri: str | None = None
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.resumed = False
        self._started = False
        self._finished = False
        self._worker: BackgroundWorker | None = None
        self._client = None
        self._ready = threading.Event()
        self._first_attempt_done = threading.Event()
        self._setup_error: BaseException | None = None
        self._last_setup_attempt = -math.inf
        self._params: dict[str, str] = {}
        self._params_done = False
        self._config_text = ""
        self._config_done = False
        self._run_dir: Path | None = None
        self._record: Path | None = None  # the local record of every step, to replay what the store missed
        self._start_step = 0
        self._gap_from: int | None = None  # the first step the store may lack (None: none; worker thread only)
        self._stored_ahead: set[tuple[str, int]] = set()  # (key, step) past start_step the store already has
        self._metrics: deque[list] = deque(maxlen=self.config.max_pending)
        self._metrics_lock = threading.Lock()
        self._metrics_task_queued = False
        self._last_metrics_send = -math.inf
        self._warn_lock = threading.Lock()
        self._failures = 0
        self._skipped = 0
        self._dropped_metrics = 0
        self._dropped_from: int | None = None  # the first step dropped since the last send (it replays them)
        self._failures_since_warning = 0
        self._last_warning = -math.inf
        self._failing = False
        self._tmp = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, config_dict: Mapping[str, Any], config_text: str, run_dir: str | Path, *,
              record: str | Path | None = None, start_step: int = 0) -> None:
        """Create the run (or resume the one recorded in ``run_dir``), log the config as params and artifact.

        ``record``: the run's metrics.jsonl, from which missed steps are replayed; ``start_step``: the
        steps done before this process (a resumed run does not send again the later steps the store has).
        """
        if not self.active or self._started:
            return
        self._started = True
        self._run_dir = Path(run_dir)
        self._record = None if record is None else Path(record)
        self._start_step = int(start_step)
        apply_http_timeouts(self.config.timeout_s)
        quiet_mlflow_urls()
        telemetry_off()
        try:
            from mlflow.tracking import MlflowClient  # noqa: F401  (import cost paid here, not on the worker)
        except Exception as exc:  # pragma: no cover - mlflow is a dependency
            self._warn(f"MLflow cannot be imported ({exc}); tracking is off for this run")
            self.active = False
            return
        if dataclasses.is_dataclass(config_dict):
            config_dict = dataclasses.asdict(config_dict)
        self._params = flatten_params(redact(dict(config_dict)))
        self._config_text = redact_text(config_text)
        self.tracking_uri = self.config.resolved_uri()
        try:
            db = sqlite_path(self.tracking_uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="dcd-tracking-")
        except OSError as exc:
            self._warn(f"cannot prepare MLflow tracking ({exc}); tracking is off for this run", force=True)
            self.active = False
            return
        self._worker = BackgroundWorker(self.config.max_pending, self._on_error, self._on_success)
        self._worker.submit("start run", self._setup, essential=True)
        atexit.register(self._at_exit)
        wait_s = max(30.0, 4 * self.config.timeout_s)
        if not self._first_attempt_done.wait(wait_s):
            self._warn(f"MLflow run not ready after {wait_s:.0f} s; training goes on and logging catches up", force=True)
        elif self.run_id is None:
            self._warn("no MLflow run yet (store unreachable); training goes on, logging retries in the background", force=True)
        else:
            logger.info("%s", self.describe())

    def finish(self, status: str = "FINISHED", timeout_s: float | None = None,
               tags: Mapping[str, str] | None = None) -> bool:
        """Send what is queued, replay what the store missed, set ``tags`` and mark the run ``status``,
        for at most ``timeout_s`` (default ``finish_timeout_s``); True if everything arrived."""
        if status not in FINISH_STATUSES:
            raise ValueError(f"finish(status={status!r}): status must be one of {', '.join(FINISH_STATUSES)}")  # internal
        if not self.active or not self._started or self._finished:
            return True
        self._finished = True
        atexit.unregister(self._at_exit)
        end_tags = {str(k): redact_text(str(v))[:5000] for k, v in (tags or {}).items()}
        self._worker.submit("finish run", lambda: self._finish_run(status, end_tags), essential=True)
        timeout_s = self.config.finish_timeout_s if timeout_s is None else timeout_s
        flushed = self._worker.close(timeout_s)
        stats = self.stats
        if self.run_id is None and self._run_dir is not None:
            self._record_pending_run(status)
        elif not flushed or stats.failed or stats.dropped or self._skipped:
            behind = not flushed or self._gap_from is not None
            self._warn(
                f"MLflow run {self.run_id} finishing as {status}: {stats.failed} logging calls failed, "
                f"{stats.dropped} dropped, {self._skipped} skipped"
                + ("" if flushed else f"; gave up waiting for the store after {timeout_s:.0f} s")
                + (f"; once the store answers, `dcd-train --sync-tracking {self._run_dir}` sends the missing "
                   "steps and the status" if behind and self._record is not None and self.run_id else ""),
                force=True,
            )
        if self._tmp is not None and flushed:
            self._tmp.cleanup()
        return flushed

    def _record_pending_run(self, status: str) -> None:
        """The store never answered: keep what the run would have been (redacted) for ``--sync-tracking``, and say so."""
        pending = {"experiment": self.config.experiment,
                   "run_name": None if self.config.run_name is None else redact_text(self.config.run_name),
                   "params": self._params, "config": self._config_text,
                   "run_dir": redact_text(str(self._run_dir.resolve()))}
        try:
            self._run_dir.mkdir(parents=True, exist_ok=True)
            tmp = self._run_dir / (PENDING_RUN_FILE + ".tmp")
            tmp.write_text(json.dumps(pending, indent=1))
            tmp.replace(self._run_dir / PENDING_RUN_FILE)
            self._write_uri_file()
        except OSError as exc:
            self._warn(f"cannot record the MLflow run to create later ({exc})", force=True)
        later = (f"; once it answers, `dcd-train --sync-tracking {self._run_dir}` creates the run and sends "
                 "every step from metrics.jsonl" if self._record is not None else "")
        self._warn(f"no MLflow run was created: the store at {redact_uri(self.tracking_uri or '')} did not answer "
                   f"during the whole run (it ended {status}){later}", force=True)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything logged so far has reached the store (or the timeout passes)."""
        if not self.active or not self._started or self._finished:
            return True
        self._queue_metrics_flush()
        return self._worker.flush(self.config.finish_timeout_s if timeout_s is None else timeout_s)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))

    def _at_exit(self) -> None:
        """The process is exiting without finish(): the training did not complete."""
        self.finish("FAILED", timeout_s=min(self.config.finish_timeout_s, 5.0))

    # ------------------------------------------------------------------ logging calls (never block)
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue scalar metrics for ``step``; non-numeric values are skipped with a warning."""
        if not self._accepting():
            return
        timestamp = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                self._skip(f"metric {key!r} at step {step} is not a number ({type(value).__name__}); skipped")
                continue
            entries.append((safe_key(key), number, timestamp, int(step)))
        if not entries:
            return
        with self._metrics_lock:
            if len(self._metrics) == self._metrics.maxlen:
                self._dropped_metrics += 1
                oldest = self._metrics[0][0][3]
                self._dropped_from = oldest if self._dropped_from is None else min(self._dropped_from, oldest)
                self._warn("MLflow is behind: dropped the oldest queued step of metrics")
            self._metrics.append(entries)
        self._queue_metrics_flush(force=False)

    def should_plot(self, step: int, last: int = 0) -> bool:
        """True on the steps where the trainer should log its plots: every ``plot_interval`` and at ``last``."""
        return self.active and due(step, self.config.plot_interval, last=last)

    def log_weight_plots(self, step: int, hist_edges, hist_counts, pos_bin_edges, pos_bin_mean_weight) -> None:
        """Render the weight histogram and mean weight by response position; log as ``plots/*_step<N>.png``."""
        if not self._accepting():
            return
        edges, counts = as_float_array(hist_edges, "hist_edges"), as_float_array(hist_counts, "hist_counts")
        pos_edges = as_float_array(pos_bin_edges, "pos_bin_edges")
        pos_mean = as_float_array(pos_bin_mean_weight, "pos_bin_mean_weight")
        check_binned(edges, counts, "hist_edges", "hist_counts")
        check_binned(pos_edges, pos_mean, "pos_bin_edges", "pos_bin_mean_weight")

        def task() -> None:
            run_id = self._ensure_run()
            folder = Path(self._tmp.name) / f"plots-{step}"
            hist = render_weight_histogram(folder / f"weight_hist_step{step:07d}.png", step, edges, counts)
            pos = render_weight_by_position(folder / f"weight_by_position_step{step:07d}.png", step, pos_edges, pos_mean)
            for png in (hist, pos):
                self._client.log_artifact(run_id, str(png), "plots")
                png.unlink(missing_ok=True)
            folder.rmdir()

        self._worker.submit(f"weight plots (step {step})", task)

    def log_curve_plot(self, step: int, name: str, title: str, curves, reference=None, ylabel: str = "value") -> None:
        """Render metrics over steps (``{metric: (steps, values)}``, ``reference`` dashed) as ``plots/<name>.png``.

        One file per ``name``, replaced at every call: its latest version holds the whole curve.
        """
        if not self._accepting():
            return
        lines, dashed = check_curves(curves), check_curves(reference) if reference else {}

        def task() -> None:
            run_id = self._ensure_run()
            folder = Path(self._tmp.name) / f"curves-{name}-{step}"
            png = render_metric_curves(folder / f"{name}.png", step, title, lines, dashed, ylabel)
            self._client.log_artifact(run_id, str(png), "plots")
            png.unlink(missing_ok=True)
            folder.rmdir()

        self._worker.submit(f"{name} plot (step {step})", task)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file; text files are uploaded redacted (the file on disk is left alone)."""
        if not self._accepting():
            return
        source = Path(path).resolve()

        def task() -> None:
            run_id = self._ensure_run()
            if not source.is_file():
                raise FileNotFoundError(f"artifact {source} is not a file (log_artifact takes one file)")  # internal
            upload = self._redacted_copy(source)
            self._client.log_artifact(run_id, str(upload), artifact_path)

        self._worker.submit(f"artifact {source.name}", task)

    def log_text(self, text: str, name: str) -> None:
        """Store ``text`` (redacted) as the artifact file ``name`` (e.g. ``notes/summary.txt``)."""
        if not self._accepting():
            return
        clean = redact_text(text)
        self._worker.submit(f"text {name}", lambda: self._client.log_text(self._ensure_run(), clean, name))

    # ------------------------------------------------------------------ where the run is
    @property
    def run_url(self) -> str | None:
        """The run's page: on the server, or (local store) where ``mlflow ui`` serves it by default."""
        if self.run_id is None or self.tracking_uri is None:
            return None
        base = self.tracking_uri if self.tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        return f"{redact_uri(base).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def describe(self) -> str:
        """A human sentence: tracking URI, experiment, run id and how to look at it."""
        if not self.config.enabled:
            return "MLflow tracking is off (tracking.enabled=false)"
        if not self.is_logging_rank:
            return "MLflow tracking happens on the logging rank (rank 0), not on this rank"
        if not self._started:
            return "MLflow tracking not started yet"
        if not self.active:
            return "MLflow tracking is off for this run (it could not be set up: see the warning)"
        uri = redact_uri(self.tracking_uri or "")
        if self.run_id is None and self._finished:
            return (f"no MLflow run: the store at {uri} did not answer during the whole run; "
                    f"`dcd-train --sync-tracking {self._run_dir}` creates it once the store answers")
        run = self.run_id or "(not created yet: the store was unreachable)"
        text = f"MLflow run {run} in experiment '{self.config.experiment}'"
        if self.resumed:
            text += " (resumed)"
        text += f" at {uri}"
        if uri.startswith(("http://", "https://")):
            return text + (f"; open {self.run_url}" if self.run_url else "")
        view = f"mlflow ui --backend-store-uri {uri}"
        return text + f"; view with `{view}`" + (f" then open {self.run_url}" if self.run_url else "")

    @property
    def stats(self) -> WorkerStats:
        """Background worker counters (done / failed / dropped / pending calls)."""
        if self._worker is None:
            return WorkerStats()
        stats = self._worker.stats
        stats.dropped += self._dropped_metrics
        return stats

    # ------------------------------------------------------------------ internals (worker thread)
    def _accepting(self) -> bool:
        return self.active and self._started and not self._finished and self._worker is not None

    def _setup(self) -> None:
        """Create or resume the run, then log params and the config (idempotent: retried until done)."""
        self._last_setup_attempt = time.monotonic()
        try:
            if self._client is None:
                if self._client_factory is not None:
                    self._client = self._client_factory(self.tracking_uri)
                else:
                    from mlflow.tracking import MlflowClient

                    self._client = MlflowClient(tracking_uri=self.tracking_uri)
            if self.run_id is None:
                self._create_or_resume()
                if self.resumed and self._record is not None:
                    self._gap_from = 0  # the process before may have missed steps: check them at the first send
                    self._find_stored_ahead()
            if not self._params_done:
                self._log_params()
            if not self._config_done:
                name = CONFIG_ARTIFACT
                if self.resumed:
                    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
                    name = f"config/config.resume-{stamp}.yaml"
                self._client.log_text(self.run_id, self._config_text, name)
                self._config_done = True
        except BaseException as exc:
            self._setup_error = exc
            raise
        else:
            self._setup_error = None
            self._ready.set()
        finally:
            self._first_attempt_done.set()

    def _create_or_resume(self) -> None:
        from mlflow.entities import LifecycleStage
        from mlflow.exceptions import MlflowException

        id_file = self._run_dir / RUN_ID_FILE
        previous = id_file.read_text().strip() if id_file.is_file() else ""
        if previous:
            try:
                run = self._client.get_run(previous)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                run = None
            if run is not None and run.info.lifecycle_stage != LifecycleStage.DELETED:
                self._client.update_run(previous, status="RUNNING")
                for tag in END_TAGS:  # how the run ended before no longer holds
                    if tag in (getattr(run.data, "tags", None) or {}):
                        self._client.delete_tag(previous, tag)
                self.experiment_id = run.info.experiment_id
                self.run_id = previous
                self.resumed = True
                self._write_uri_file()
                return
            self._warn(
                f"{id_file} names run {previous}, which is not in {redact_uri(self.tracking_uri)}; starting a new run",
                force=True,
            )
        self.experiment_id = self._ensure_experiment()
        tags = {"dcd.run_dir": redact_text(str(self._run_dir.resolve()))}
        run_name = None if self.config.run_name is None else redact_text(self.config.run_name)
        run = self._client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self._run_dir.mkdir(parents=True, exist_ok=True)
        tmp = id_file.with_suffix(".tmp")
        tmp.write_text(self.run_id + "\n")
        tmp.replace(id_file)
        self._write_uri_file()
        pending = self._run_dir / PENDING_RUN_FILE
        if pending.is_file():  # an earlier process of this run never reached the store: send its steps too
            pending.unlink()
            self._gap_from = 0

    def _write_uri_file(self) -> None:
        """Record where the run is (password redacted), so ``dcd-train --sync-tracking`` finds it later."""
        target = self._run_dir / TRACKING_URI_FILE
        tmp = target.with_suffix(".tmp")
        tmp.write_text(redact_uri(self.tracking_uri) + "\n")
        tmp.replace(target)

    def _ensure_experiment(self) -> str:
        from mlflow.entities import LifecycleStage
        from mlflow.exceptions import MlflowException

        name = self.config.experiment
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == LifecycleStage.DELETED:
                self._client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        try:
            return self._client.create_experiment(name, artifact_location=default_artifact_location(self.tracking_uri))
        except MlflowException:
            experiment = self._client.get_experiment_by_name(name)  # created meanwhile by someone else
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_params(self) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        todo = {k: v for k, v in self._params.items() if k not in existing}
        changed = sorted(k for k, v in self._params.items() if k in existing and existing[k] != v)
        for chunk in batched(list(todo.items()), MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
        if changed:
            # MLflow params are write-once; the resumed config artifact holds the new values.
            self._client.set_tag(self.run_id, "dcd.resume_changed_params", ",".join(changed)[:5000])
            self._warn(f"resumed run changes params {', '.join(changed[:10])}; new values are in config/*.yaml", force=True)
        self._params_done = True

    def _ensure_run(self) -> str:
        if self._ready.is_set():
            return self.run_id
        if time.monotonic() - self._last_setup_attempt >= self.setup_retry_s:
            try:
                self._setup()
            except Exception as exc:
                if self.run_id is None:
                    raise
                self._on_error("finish run setup", exc)  # the run exists: log into it anyway
        if self.run_id is None:
            raise RunUnavailable("the MLflow run is not created yet (store unreachable); call skipped")
        return self.run_id

    def _queue_metrics_flush(self, force: bool = True) -> None:
        """Queue one send of every buffered step; unforced, at most every ``metrics_flush_s``."""
        with self._metrics_lock:
            if self._metrics_task_queued or not self._metrics:
                return
            if not force and time.monotonic() - self._last_metrics_send < self.config.metrics_flush_s:
                return
            self._metrics_task_queued = True
            self._last_metrics_send = time.monotonic()
        self._worker.submit("metrics", self._send_metrics, essential=True)  # one at a time; its loss would stall metrics

    def _send_metrics(self) -> None:
        """Send the buffered steps; after a failure, once a send succeeds, replay the older steps the store missed."""
        from mlflow.entities import Metric

        with self._metrics_lock:
            pending = list(self._metrics)
            self._metrics.clear()
            self._metrics_task_queued = False
            dropped_from, self._dropped_from = self._dropped_from, None
        self._note_gap(dropped_from)
        entries = [Metric(k, v, ts, step) for batch in pending for (k, v, ts, step) in batch
                   if (k, step) not in self._stored_ahead]
        try:
            run_id = self._ensure_run()
            for chunk in batched(entries, MAX_METRICS_PER_BATCH):
                self._client.log_batch(run_id, metrics=list(chunk))
        except BaseException:
            self._note_gap(min((step for batch in pending for (_, _, _, step) in batch), default=None))
            raise
        if self._gap_from is not None and pending:
            # Every record of a step before the newest one sent has been queued already (the sink queues
            # a step, then writes it): replaying those cannot race with a later send of the same value.
            self._catch_up(before_step=max(step for batch in pending for (_, _, _, step) in batch))

    def _note_gap(self, step: int | None) -> None:
        """The store may lack the values of ``step`` (None: nothing lost)."""
        if step is not None:
            self._gap_from = step if self._gap_from is None else min(self._gap_from, step)

    def _catch_up(self, before_step: int | None) -> None:
        """Replay from the local record the values of the steps from the gap (to ``before_step``, or all) the store lacks."""
        if self._gap_from is None or self._record is None:
            return
        run_id = self._ensure_run()
        wanted = values_by_key(read_record(self._record), before_step, from_step=self._gap_from)
        sent = replay_missing(self._client, run_id, wanted)
        self._gap_from = None
        if sent:
            self._warn(f"MLflow caught up: replayed {sent} metric values the store had missed from {self._record}",
                       force=True)

    def _find_stored_ahead(self) -> None:
        """On resume: the (key, step) past ``start_step`` the store has from the process before (not sent twice)."""
        run = self._client.get_run(self.run_id)
        keys = list(getattr(getattr(run, "data", None), "metrics", {}) or {})
        self._stored_ahead = {(key, step) for key in keys for step in stored_steps(self._client, self.run_id, key)
                              if step > self._start_step}

    def _finish_run(self, status: str, tags: Mapping[str, str]) -> None:
        """The last task: send what is buffered, replay what the store lacks, set the tags and the status
        (each tried even if one before failed; the first failure is raised)."""
        errors = []
        for part in (self._send_metrics, lambda: self._catch_up(None), lambda: self._set_terminated(status, tags)):
            try:
                part()
            except Exception as exc:  # noqa: BLE001 - reported by the worker, as any failed call
                errors.append(exc)
        if errors:
            raise errors[0]

    def _set_terminated(self, status: str, tags: Mapping[str, str] | None = None) -> None:
        run_id = self._ensure_run()
        for key, value in (tags or {}).items():
            self._client.set_tag(run_id, key, value)
        self._client.set_terminated(run_id, status=status)

    def _redacted_copy(self, source: Path) -> Path:
        if source.stat().st_size > _TEXT_ARTIFACT_MAX_BYTES:
            return source
        try:
            text = source.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            return source
        clean = redact_text(text)
        if clean == text:
            return source
        folder = Path(tempfile.mkdtemp(dir=self._tmp.name))
        copy = folder / source.name
        copy.write_text(clean, encoding="utf-8")
        return copy

    # ------------------------------------------------------------------ warnings
    def _on_error(self, name: str, exc: BaseException) -> None:
        self._failing = True
        self._failures += 1
        self._warn(f"MLflow call '{name}' failed, training continues: {type(exc).__name__}: {exc}")

    def _on_success(self, name: str) -> None:
        if self._failing:
            self._failing = False
            self._warn(f"MLflow logging works again ('{name}' succeeded after {self._failures} failed calls)", force=True)

    def _skip(self, message: str) -> None:
        self._skipped += 1
        self._warn(message)

    def _warn(self, message: str, force: bool = False) -> None:
        """Warn now if forced or the last warning is older than WARN_INTERVAL_S; else count it for later."""
        with self._warn_lock:
            now = time.monotonic()
            if not force and now - self._last_warning < WARN_INTERVAL_S:
                self._failures_since_warning += 1
                return
            suppressed, self._failures_since_warning = self._failures_since_warning, 0
            if not force:
                self._last_warning = now
        text = redact_text(message)
        if len(text) > 600:
            text = text[:600] + "..."
        if suppressed:
            text += f" ({suppressed} similar warnings suppressed)"
        logger.warning("%s", text)
