"""Score generations against references: per-problem correctness, accuracy, pass@k, results.json.

``accuracy`` is the mean over problems of the fraction of correct samples: greedy pass@1 when
n = 1, the mean accuracy over n samples (an unbiased pass@1) otherwise. ``pass@k`` uses the
unbiased estimator of Chen et al. (2021). MLflow logging goes through a ``log_metrics(dict,
step)`` callable so this module never imports the tracking layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dcd_megatron.eval.answers import extract_answer, grade
from dcd_megatron.eval.benchmarks import Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")  # internal
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")  # internal
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), stable for large n
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass
class ProblemRecord:
    """One problem's samples: extracted answers, correctness, lengths, whether cut off."""

    id: str
    reference: str
    predictions: list[str | None]
    correct: list[bool]
    response_tokens: list[int]
    truncated: list[bool]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_correct(self) -> int:
        return sum(self.correct)


@dataclass
class DecodingSettings:
    """Everything about how the samples were produced that a results table must state."""

    temperature: float
    top_p: float
    n_samples: int
    max_new_tokens: int
    template: str
    template_text: str
    seed: int = 0


@dataclass
class BenchmarkResult:
    """A results table for one benchmark under one decoding setting."""

    benchmark: str
    run: str
    settings: DecodingSettings
    records: list[ProblemRecord]
    model: str = "model"

    @property
    def n_problems(self) -> int:
        return len(self.records)

    def summary(self) -> dict[str, float | int]:
        """Accuracy (+- its standard error over problems), pass@k, and generation health figures."""
        n = self.settings.n_samples
        per_problem = [r.n_correct / len(r.correct) for r in self.records]
        acc = sum(per_problem) / len(per_problem)
        var = sum((a - acc) ** 2 for a in per_problem) / max(len(per_problem) - 1, 1)
        out: dict[str, float | int] = {
            "accuracy": acc,
            "accuracy_stderr": math.sqrt(var / len(per_problem)),
            "n_problems": len(self.records),
            "n_samples": n,
        }
        for k in sorted({1, *(2**e for e in range(1, 11) if 2**e <= n), n}):
            out[f"pass_at_{k}"] = sum(pass_at_k(len(r.correct), r.n_correct, k) for r in self.records) / len(
                self.records
            )
        flat = [(p, t, ln) for r in self.records for p, t, ln in zip(r.predictions, r.truncated, r.response_tokens, strict=True)]
        out["no_answer_fraction"] = sum(p is None for p, _, _ in flat) / len(flat)
        out["truncated_fraction"] = sum(t for _, t, _ in flat) / len(flat)
        out["mean_response_tokens"] = sum(ln for _, _, ln in flat) / len(flat)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "run": self.run,
            "model": self.model,
            **asdict(self.settings),
            **self.summary(),
            "records": [{**asdict(r), "n_correct": r.n_correct} for r in self.records],
        }


def score_benchmark(
    benchmark: str,
    answer_format: str,
    problems: Sequence[Problem],
    completions: Sequence[Sequence[str]],
    *,
    settings: DecodingSettings,
    response_tokens: Sequence[Sequence[int]] | None = None,
    truncated: Sequence[Sequence[bool]] | None = None,
    run: str = "greedy",
    model: str = "model",
    grade_timeout_s: int | None = 5,
) -> BenchmarkResult:
    """Extract and grade every completion (``completions[problem][sample]``, decoded text)."""
    if not problems:
        raise ValueError(f"{benchmark}: no problems to score")  # internal
    if len(completions) != len(problems):
        raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems")  # internal
    records = []
    for k, (problem, texts) in enumerate(zip(problems, completions, strict=True)):
        if len(texts) != settings.n_samples:
            raise ValueError(  # internal
                f"problem {problem.id}: {len(texts)} completions, settings say n_samples={settings.n_samples}"
            )
        preds = [extract_answer(t, answer_format) for t in texts]
        records.append(
            ProblemRecord(
                id=problem.id,
                reference=problem.reference,
                predictions=preds,
                correct=[grade(p, problem.reference, timeout_s=grade_timeout_s) for p in preds],
                response_tokens=list(response_tokens[k]) if response_tokens else [0] * len(texts),
                truncated=list(truncated[k]) if truncated else [False] * len(texts),
                meta=dict(problem.meta),
            )
        )
    return BenchmarkResult(benchmark, run, settings, records, model)


def save_results(result: BenchmarkResult, out_dir: str | Path) -> Path:
    """Write ``<out_dir>/<benchmark>/<run>/results.json``; returns its path."""
    path = Path(out_dir) / result.benchmark / result.run / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    return path


SUMMARY_COLUMNS = ("benchmark", "run", "n_problems", "n_samples", "temperature", "top_p",
                   "max_new_tokens", "template", "accuracy", "accuracy_stderr")


def results_table(results: Sequence[BenchmarkResult]) -> str:
    """A Markdown table with one row per benchmark and decoding setting."""
    rows = []
    for r in results:
        d = {**asdict(r.settings), **r.summary(), "benchmark": r.benchmark, "run": r.run}
        d["accuracy"] = f"{100 * d['accuracy']:.1f}"
        d["accuracy_stderr"] = f"{100 * d['accuracy_stderr']:.1f}"
        rows.append("| " + " | ".join(str(d[c]) for c in SUMMARY_COLUMNS) + " |")
    head = "| " + " | ".join(SUMMARY_COLUMNS) + " |\n|" + "---|" * len(SUMMARY_COLUMNS)
    return "\n".join([head, *rows])


def log_results(
    result: BenchmarkResult,
    log_metrics: Callable[[dict[str, float], int], Any],
    *,
    step: int = 0,
    prefix: str = "eval",
) -> dict[str, float]:
    """Log the summary as ``<prefix>/<benchmark>/<run>/<metric>`` (MLflow-safe names); returns it."""
    metrics = {f"{prefix}/{result.benchmark}/{result.run}/{k}": float(v) for k, v in result.summary().items()}
    log_metrics(metrics, step)
    return metrics
