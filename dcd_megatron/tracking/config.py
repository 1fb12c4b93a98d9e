"""Typed, validated settings for experiment tracking (MLflow) and where its default store lives."""

import os
from dataclasses import dataclass
from pathlib import Path

from dcd_megatron.errors import ConfigError

DEFAULT_STORE_DIR = "mlruns"
DEFAULT_DB_NAME = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "artifacts"


@dataclass
class TrackingConfig:
    """What to log to MLflow and how patiently; see docs/tracking.md."""

    enabled: bool = True  # log to MLflow (from one rank)
    # None: env MLFLOW_TRACKING_URI, else an embedded SQLite store under ./mlruns/.
    tracking_uri: str | None = None
    experiment: str = "dcd-megatron"  # MLflow experiment name
    run_name: str | None = None  # MLflow run name (null = MLflow picks one)
    # Render the weight-distribution PNGs every this many steps (0 = never).
    plot_interval: int = 50
    # Per HTTP request; a dead or slow server must not stall anything for longer.
    timeout_s: float = 5.0
    # Logging calls waiting for the background worker; beyond this the oldest are dropped.
    max_pending: int = 1000
    # finish() waits at most this long for queued calls to reach the store.
    finish_timeout_s: float = 30.0
    # Send queued step metrics at most this often, many steps per request (0 = every step):
    # one request a step cost 13 ms of CPU a step against a SQLite store, 5 ms batched by 20.
    metrics_flush_s: float = 2.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks run at construction; call again after changing fields in place."""
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"tracking.enabled must be true or false, got {self.enabled!r}")
        if self.tracking_uri is not None and (not isinstance(self.tracking_uri, str) or not self.tracking_uri.strip()):
            raise ConfigError(
                f"tracking.tracking_uri must be a non-empty URI (e.g. http://host:5000 or sqlite:///path.db) "
                f"or null for the default, got {self.tracking_uri!r}"
            )
        if isinstance(self.metrics_flush_s, bool) or not isinstance(self.metrics_flush_s, (int, float)) \
                or not 0 <= self.metrics_flush_s < float("inf"):
            raise ConfigError(f"tracking.metrics_flush_s must be a number of seconds >= 0, got {self.metrics_flush_s!r}")
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise ConfigError(f"tracking.experiment must be a non-empty name, got {self.experiment!r}")
        if self.run_name is not None and not isinstance(self.run_name, str):
            raise ConfigError(f"tracking.run_name must be a string or null, got {self.run_name!r}")
        if isinstance(self.plot_interval, bool) or not isinstance(self.plot_interval, int) or self.plot_interval < 0:
            raise ConfigError(
                f"tracking.plot_interval must be an integer >= 0 (steps between plots, 0 = never), got {self.plot_interval!r}"
            )
        for name in ("timeout_s", "finish_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"tracking.{name} must be a number of seconds > 0, got {value!r}")
        if isinstance(self.max_pending, bool) or not isinstance(self.max_pending, int) or self.max_pending < 1:
            raise ConfigError(f"tracking.max_pending must be an integer >= 1, got {self.max_pending!r}")

    def resolved_uri(self, cwd: Path | None = None) -> str:
        """The tracking URI to use: the setting, else env MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db."""
        if self.tracking_uri:
            return self.tracking_uri
        env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if env:
            return env
        root = (cwd or Path.cwd()).resolve() / DEFAULT_STORE_DIR
        return f"sqlite:///{root / DEFAULT_DB_NAME}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, or None for any other store."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix) :].split("?", 1)[0]
    return Path(path) if path else None


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: next to a SQLite database (``<dir>/artifacts``), else the store's choice."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / DEFAULT_ARTIFACT_DIR).as_uri()
