"""Turn a nested config dict into MLflow params: dotted keys, string values within MLflow's limits."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

# MLflow's limits (mlflow.utils.validation): value length, key length, params per log_batch call.
MAX_PARAM_VALUE_CHARS = 6000
MAX_KEY_CHARS = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
TRUNCATION_MARK = "...[truncated]"

_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")
T = TypeVar("T")


def safe_key(key: str) -> str:
    """An MLflow-valid param/metric name: alphanumerics, ``_-. /`` only, at most 250 chars."""
    return _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY_CHARS]


def param_value(value: Any) -> str:
    """The string MLflow stores for ``value`` (lists/dicts as compact JSON), truncated to 6000 chars."""
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = str(value)
    else:
        text = json.dumps(value, default=str, separators=(",", ":"))
    if len(text) > MAX_PARAM_VALUE_CHARS:
        text = text[: MAX_PARAM_VALUE_CHARS - len(TRUNCATION_MARK)] + TRUNCATION_MARK
    return text


def flatten_params(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": "1", "c": "[1,2]"}``; empty mappings keep their key as ``{}``."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=name + "."))
        else:
            out[safe_key(name)] = param_value(dict(value) if isinstance(value, Mapping) else value)
    return out


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of at most ``size`` items (MLflow caps entities per batch call)."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")  # internal
    for start in range(0, len(items), size):
        yield items[start : start + size]
