"""Where a run's metrics go: metrics.jsonl, MLflow, the console and the plots, each at its interval.

Every rank holds a `MetricsSink` (the step's metrics reach every rank); only rank 0 writes.
MLflow and metrics.jsonl get every step; the console every `train.log_interval` steps and the
last; the plots every `tracking.plot_interval` steps and the last (`tracking.intervals.due`).
metrics.jsonl holds each step once: a resumed run first drops the records past its checkpoint
(the steps it repeats), and it is the record the tracker replays into MLflow after an outage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dcd_megatron.configs import to_dict
from dcd_megatron.loss.report import KNOWLEDGE_KEYS, knowledge_summary
from dcd_megatron.tracking import MetricHistory, ProgressPrinter, Tracker
from dcd_megatron.tracking.record import run_end, truncate_record

# Metrics whose history a run keeps (curve plot, end-of-run summary): the knowledge / fork
# diagnostics and certain_token_frac, the level weight_mass_certain has under plain SFT.
HISTORY_KEYS = (*KNOWLEDGE_KEYS, "certain_token_frac")
VALIDATION_KEYS = ("loss", "ce", "weighted_ce")  # reported as val_<key>


def scalars(metrics: dict) -> dict:
    """The plain numbers of a metrics dict (the report also carries histograms)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


class MetricsSink:
    """metrics.jsonl, the MLflow tracker, the console lines and the plots of one run."""

    def __init__(self, run, start_step: int):
        """`run`: the run's `train.setup.RunFacts`; `start_step`: steps done before this process."""
        cfg = run.cfg
        self.is_logger = run.is_logger
        self.steps = cfg.train.steps
        self.output_dir = run.output_dir
        self.path = run.output_dir / "metrics.jsonl"
        self.last_step = start_step  # the newest step logged
        if self.is_logger:
            dropped = truncate_record(self.path, start_step)
            if dropped:
                self.say(f"metrics.jsonl: dropped {dropped} records past step {start_step}, "
                         "the steps this run does again from its checkpoint")
        self.tracker = Tracker(cfg.tracking, is_logging_rank=self.is_logger)
        self.printer = ProgressPrinter(cfg.train.steps, cfg.train.log_interval, start_step=start_step)
        self.tracker.start(to_dict(cfg), run.config_text, run.output_dir, record=self.path, start_step=start_step)
        self.history = MetricHistory(HISTORY_KEYS)
        if self.is_logger and start_step > 0:
            self.history.load_jsonl(self.path, start_step)  # the curves go on from the steps before the resume

    def describe(self) -> str:
        return self.tracker.describe()

    def say(self, line: str) -> None:
        """One console line, from rank 0."""
        if self.is_logger:
            print(line, flush=True)

    def _append(self, step: int, values: dict) -> None:
        self.tracker.log_metrics(values, step=step)
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")

    def log_step(self, step: int, metrics: dict) -> None:
        """A finished optimizer step (`step` steps done): every sink, each at its interval."""
        if not self.is_logger:
            return
        values = scalars(metrics)
        self._append(step, values)
        self.last_step = max(self.last_step, step)
        self.history.add(step, values)
        if self.printer.should_print(step):
            self.printer.print(step, metrics)
        if self.tracker.should_plot(step, last=self.steps):
            self._plots(step, metrics)

    def log_validation(self, step: int, values: dict) -> None:
        if not self.is_logger:
            return
        self._append(step, values)
        print(f"step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in values.items()), flush=True)

    def _plots(self, step: int, metrics: dict) -> None:
        """The weight histogram and by-position plots of this step, and the knowledge / fork curves so far."""
        tracker, history = self.tracker, self.history
        if "weight_hist_counts" in metrics:
            tracker.log_weight_plots(
                step,
                metrics["weight_hist_edges"],
                metrics["weight_hist_counts"],
                metrics["weight_by_position_edges"],
                metrics["weight_by_position"],
            )
        curves = history.curves(KNOWLEDGE_KEYS)
        if curves:
            tracker.log_curve_plot(
                step, "knowledge_weights", "Weight on teacher-certain tokens (knowledge) vs forks", curves,
                reference=history.curves(["certain_token_frac"]), ylabel="weight share / relative weight",
            )

    def finish(self, status: str, step: int, last_metrics: dict, stop_reason: str | None = None,
               failure: str | None = None) -> None:
        """final_metrics.json (when a step ran, written atomically) and the tracker's end; safe after an error.

        A run stopped early (a signal, `train.stop_after`: `stop_reason`) is "STOPPED" with
        "stopped_at_step" and "stop_reason"; in MLflow it is KILLED with the tags dcd.stop_reason
        and dcd.stopped_at_step. A failed run reports the last step it logged, and `failure` (the
        one-line error that ended it) when a user-fixable problem did (a full disk at a save).
        """
        step = max(step, self.last_step)
        final = {"step": step, "status": status, "steps_planned": self.steps}
        if stop_reason is not None:
            final.update(status="STOPPED", stopped_at_step=step, stop_reason=stop_reason)
        if failure is not None:
            final["failure"] = failure
        if self.is_logger and last_metrics:
            path = Path(self.output_dir) / "final_metrics.json"
            tmp = path.with_name(path.name + ".tmp")
            try:
                tmp.write_text(json.dumps({**final, **scalars(last_metrics)}, indent=1))
                os.replace(tmp, path)
            except OSError as exc:  # a full disk must not hide the error that ended the run
                print(f"could not write {path} ({exc.strerror or exc}): the run ended {final['status']}", flush=True)
        mlflow_status, tags = run_end(final)
        self.tracker.finish(mlflow_status, tags=tags)

    def summary(self) -> None:
        """The knowledge / fork diagnostics, first -> last, on the console."""
        if self.is_logger:
            for line in knowledge_summary(self.history.curves()):
                print(line, flush=True)
