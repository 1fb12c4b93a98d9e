"""Observability: MLflow tracking from one rank, weight-diagnostic plots, console progress lines.

Importing this package does not import MLflow or matplotlib; ``Tracker.start`` does.
"""

from dcd_megatron.tracking.config import TrackingConfig
from dcd_megatron.tracking.history import MetricHistory
from dcd_megatron.tracking.params import flatten_params
from dcd_megatron.tracking.progress import ProgressPrinter
from dcd_megatron.tracking.redact import redact, redact_text, looks_secret
from dcd_megatron.tracking.tracker import Tracker, default_is_logging_rank

__all__ = [
    "MetricHistory",
    "ProgressPrinter",
    "Tracker",
    "TrackingConfig",
    "default_is_logging_rank",
    "flatten_params",
    "looks_secret",
    "redact",
    "redact_text",
]
