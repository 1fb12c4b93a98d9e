"""The history of a few scalar metrics over a run, for curve plots and the end-of-run summary."""

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from dcd_megatron.tracking.record import read_record


class MetricHistory:
    """``(step, value)`` pairs of the metrics named in ``keys``; a resumed run seeds it from metrics.jsonl."""

    def __init__(self, keys: Iterable[str]):
        self.keys = tuple(keys)
        self._steps: dict[str, list[int]] = {k: [] for k in self.keys}
        self._values: dict[str, list[float]] = {k: [] for k in self.keys}

    def add(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record this step's value of every tracked key that is present and a finite number."""
        for key in self.keys:
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._steps[key].append(int(step))
                self._values[key].append(float(value))

    def load_jsonl(self, path: Path, up_to_step: int) -> None:
        """Add the records of ``path`` (one JSON object with a "step" a line) up to ``up_to_step``.

        Later records of a step replace earlier ones (a run killed after its last checkpoint
        logged steps that the resumed run repeats); unreadable lines are skipped.
        """
        by_step = {r["step"]: r for r in read_record(path) if r["step"] <= up_to_step and any(k in r for k in self.keys)}
        for step in sorted(by_step):
            self.add(step, by_step[step])

    def curves(self, keys: Iterable[str] | None = None) -> dict[str, tuple[list[int], list[float]]]:
        """``{key: (steps, values)}`` of the keys (default all) that have at least one value."""
        wanted = self.keys if keys is None else tuple(keys)
        return {k: (list(self._steps[k]), list(self._values[k])) for k in wanted if self._steps.get(k)}
