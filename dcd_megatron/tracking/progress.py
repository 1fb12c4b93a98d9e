"""One console line per log interval: step, loss, ESS, learning rate, grad norm, tokens/s, ETA."""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from dcd_megatron.tracking.intervals import due


@dataclass(frozen=True)
class ProgressKeys:
    """Metric names to show; each field lists candidates, the first one present in the metrics wins."""

    # "loss", "ce" (unweighted cross-entropy) and "ess" are the names dcd_megatron.loss.reduce_reports uses.
    loss: tuple[str, ...] = ("loss", "weighted_ce_normalized", "weighted_ce")
    sft: tuple[str, ...] = ("ce", "sft_loss")
    ess: tuple[str, ...] = ("ess",)
    lr: tuple[str, ...] = ("lr", "learning_rate", "optim/lr")
    grad_norm: tuple[str, ...] = ("grad_norm", "optim/grad_norm", "gnorm")
    tokens_per_s: tuple[str, ...] = ("tokens_per_s", "throughput/tokens_per_s", "tok_per_s")


def format_duration(seconds: float) -> str:
    """``83`` -> ``1m23s``, ``7500`` -> ``2h05m``, ``200000`` -> ``2d07h``; unknown -> ``?``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def format_sci(value: float) -> str:
    """``2e-4`` -> ``2.0e-4`` (two significant digits, no exponent padding)."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


class ProgressPrinter:
    """Formats and prints the progress line; ETA from the mean step time over the last ``window`` lines."""

    def __init__(
        self,
        total_steps: int,
        log_interval: int,
        *,
        start_step: int = 0,
        window: int = 10,
        keys: ProgressKeys = ProgressKeys(),
        clock: Callable[[], float] = time.monotonic,
    ):
        if total_steps < 1:
            raise ValueError(f"ProgressPrinter total_steps must be >= 1, got {total_steps}")  # internal
        if log_interval < 1:
            raise ValueError(f"ProgressPrinter log_interval must be >= 1, got {log_interval}")  # internal
        if window < 1:
            raise ValueError(f"ProgressPrinter window must be >= 1, got {window}")  # internal
        self.total_steps = total_steps
        self.log_interval = log_interval
        self.keys = keys
        self._clock = clock
        # (step, time) marks; the first is the start, so the first line already has an ETA.
        self._marks: deque[tuple[int, float]] = deque([(start_step, clock())], maxlen=window + 1)

    def should_print(self, step: int) -> bool:
        """True every ``log_interval`` steps and on the last step."""
        return due(step, self.log_interval, last=self.total_steps)

    def seconds_per_step(self) -> float | None:
        """Moving average of step time over the recorded window, or None before two marks exist."""
        (first_step, first_t), (last_step, last_t) = self._marks[0], self._marks[-1]
        if last_step <= first_step:
            return None
        return (last_t - first_t) / (last_step - first_step)

    def eta_seconds(self, step: int) -> float | None:
        per_step = self.seconds_per_step()
        return None if per_step is None else per_step * max(0, self.total_steps - step)

    def line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """Record the time of ``step`` and return e.g. ``step 40/200 | loss 1.2345 (sft 1.3001) | ... | eta 1m23s``."""
        now = self._clock()
        if step > self._marks[-1][0]:
            self._marks.append((step, now))
        parts = [f"step {step}/{self.total_steps}"]
        loss, sft = self._get(metrics, self.keys.loss), self._get(metrics, self.keys.sft)
        if loss is not None:
            parts.append(f"loss {loss:.4f}" + (f" (sft {sft:.4f})" if sft is not None else ""))
        elif sft is not None:
            parts.append(f"sft {sft:.4f}")
        if (ess := self._get(metrics, self.keys.ess)) is not None:
            parts.append(f"ess {ess:.2f}")
        if (lr := self._get(metrics, self.keys.lr)) is not None:
            parts.append(f"lr {format_sci(lr)}")
        if (gnorm := self._get(metrics, self.keys.grad_norm)) is not None:
            parts.append(f"gnorm {gnorm:.2f}")
        if (tps := self._get(metrics, self.keys.tokens_per_s)) is not None:
            parts.append(f"{tps:.0f} tok/s")
        parts.append(f"eta {format_duration(self.eta_seconds(step))}")
        return " | ".join(parts)

    def print(self, step: int, metrics: Mapping[str, Any], file: TextIO | None = None) -> str:
        """Write the line (flushed, so it shows up in Slurm logs at once) and return it."""
        text = self.line(step, metrics)
        print(text, file=file or sys.stdout, flush=True)
        return text

    @staticmethod
    def _get(metrics: Mapping[str, Any], candidates: tuple[str, ...]) -> float | None:
        for key in candidates:
            if key in metrics and metrics[key] is not None:
                try:
                    return float(metrics[key])
                except (TypeError, ValueError):
                    return None
        return None
