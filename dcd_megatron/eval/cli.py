"""``dcd-eval``: evaluate a student on math benchmarks; results tables as JSON, optionally MLflow.

The model is a dcd-train checkpoint (``--checkpoint RUN_DIR``: a run's output_dir, its
checkpoints/ or one iter folder; decoded with a KV cache, ``--recompute`` for megatron's own
forward), or comes from a ``model_loader(args) -> EvalModel`` hook: passed to ``main`` by code,
or named as ``--model-loader package.module:function`` (e.g.
``dcd_megatron.eval.fake:constant_answer_loader`` for a smoke run).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dcd_megatron.cli.errors import report_user_error, user_error_types
from dcd_megatron.errors import UserError
from dcd_megatron.eval.benchmarks import BENCHMARKS, get_benchmark, load_problems, resolve_template
from dcd_megatron.eval.generation import generate, strip_eos
from dcd_megatron.eval.interface import EvalModel
from dcd_megatron.eval.scoring import (
    BenchmarkResult,
    DecodingSettings,
    log_results,
    results_table,
    save_results,
    score_benchmark,
)

logger = logging.getLogger("dcd_megatron.eval")

ModelLoader = Callable[[argparse.Namespace], EvalModel]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dcd-eval",
        description="Evaluate a model on math benchmarks (GSM8K, MATH, MATH500, AIME, AMC, OlympiadBench).",
    )
    p.add_argument(
        "--benchmark", action="append", required=True, metavar="NAME[=SOURCE]",
        help=f"benchmark to run (repeatable); NAME is one of {sorted(BENCHMARKS)}; SOURCE is a local "
        ".jsonl/.json/.parquet file or hf:owner/name[:config][@split] (default: the benchmark's dataset)",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N problems")
    p.add_argument("--template", default=None,
                   help="prompt template: math_cot, plain, or a string with {question} (default: per benchmark)")
    p.add_argument(
        "--protocol", choices=("standard", "greedy", "sample"), default="standard",
        help="standard: greedy pass@1 everywhere plus --n samples at --temperature on the small sets "
        "(AIME, AMC); greedy: only greedy; sample: only --n samples at --temperature everywhere",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of sampled runs")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass of sampled runs")
    p.add_argument("--n", type=int, default=16, help="samples per problem in sampled runs")
    p.add_argument("--max-new-tokens", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="outputs/eval")
    p.add_argument("--checkpoint", default=None, help="checkpoint to load (read by the model loader)")
    p.add_argument("--model-loader", default=None, metavar="MODULE:FUNCTION",
                   help="function(args) -> EvalModel that loads the model")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: the loader's choice)")
    p.add_argument("--recompute", action="store_true",
                   help="--checkpoint: decode with megatron's GPTModel recomputing the prefix each token "
                   "(slow; default: a KV-cached copy of the same weights, checked against it at load)")
    p.add_argument("--grade-timeout", type=int, default=5, help="seconds per math-verify parse/verify")
    p.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=False,
                   help="log the results to MLflow")
    p.add_argument("--mlflow-tracking-uri", default=None)
    p.add_argument("--mlflow-experiment", default="dcd-eval")
    p.add_argument("--mlflow-run-name", default=None)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--verbose", action="store_true", help="show megatron-core's own start-up warnings")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: must be >= 1 (or leave it out for every problem)")
    if args.n < 1:
        p.error(f"--n {args.n}: need at least one sample per problem")
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be >= 1")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p {args.top_p}: must be in (0, 1]")
    if args.temperature <= 0 and args.protocol != "greedy":
        p.error(f"--temperature {args.temperature}: sampled runs need > 0 (use --protocol greedy for greedy only)")
    for entry in args.benchmark:
        name = entry.split("=", 1)[0]
        if name.lower() not in BENCHMARKS:
            p.error(f"--benchmark {entry}: unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    if args.template is not None:
        try:
            resolve_template(args.template)
        except ValueError as exc:
            p.error(f"--template: {exc}")


class EvalUsageError(UserError, ValueError):
    """dcd-eval cannot run as asked; the message names the option and the fix."""


def _import_loader(spec: str) -> ModelLoader:
    module, _, func = spec.partition(":")
    example = "e.g. dcd_megatron.eval.fake:constant_answer_loader"
    if not module or not func:
        raise EvalUsageError(f"--model-loader {spec!r}: expected MODULE:FUNCTION, {example}")
    try:
        loader = getattr(importlib.import_module(module), func, None)
    except ImportError as exc:
        raise EvalUsageError(f"--model-loader {spec!r}: cannot import {module!r} ({exc}); {example}") from None
    if not callable(loader):
        raise EvalUsageError(f"--model-loader {spec!r}: {module} has no function {func!r}; {example}")
    return loader


def _runs(args: argparse.Namespace, small: bool) -> list[tuple[str, float, float, int]]:
    """(run name, temperature, top_p, n) for one benchmark under the chosen protocol."""
    greedy = ("greedy", 0.0, 1.0, 1)
    sampled = (f"sampled_t{args.temperature:g}_n{args.n}", args.temperature, args.top_p, args.n)
    if args.protocol == "greedy":
        return [greedy]
    if args.protocol == "sample":
        return [sampled]
    return [greedy, sampled] if small else [greedy]


def read_benchmark(args: argparse.Namespace, entry: str):
    """The problems of one ``--benchmark NAME[=SOURCE]`` entry (read before any model loads)."""
    name, _, source = entry.partition("=")
    return load_problems(get_benchmark(name).name, source or None, limit=args.limit)


def evaluate_benchmark(model: EvalModel, args: argparse.Namespace, entry: str, problems=None) -> list[BenchmarkResult]:
    """Load one benchmark (unless its ``problems`` are given), generate under each run of the protocol, score and save."""
    name, _, source = entry.partition("=")
    spec = get_benchmark(name)
    if problems is None:
        problems = load_problems(spec.name, source or None, limit=args.limit)
    template = args.template or spec.default_template
    template_text = resolve_template(template)
    prompts = [model.encode(template_text.format(question=p.prompt)) for p in problems]
    device = args.device or model.device
    results = []
    for run, temperature, top_p, n in _runs(args, spec.small):
        logger.info("%s/%s: %d problems x %d samples", spec.name, run, len(problems), n)
        tokens = generate(
            model.model, prompts, max_new_tokens=args.max_new_tokens, eos_id=model.eos_id,
            temperature=temperature, top_p=top_p, n=n, batch_size=args.batch_size, seed=args.seed,
            progress=not args.no_progress, device=device, pad_id=model.pad_id,
        )
        texts = [[model.decode(strip_eos(s, model.eos_id)) for s in per] for per in tokens]
        lengths = [[len(s) for s in per] for per in tokens]
        cut = [[len(strip_eos(s, model.eos_id)) == len(s) for s in per] for per in tokens]
        shown = template_text.format(question="{question}")  # as the model sees it, braces unescaped
        settings = DecodingSettings(temperature, top_p, n, args.max_new_tokens, template, shown, args.seed)
        result = score_benchmark(
            spec.name, spec.answer_format, problems, texts, settings=settings, response_tokens=lengths,
            truncated=cut, run=run, model=model.name, grade_timeout_s=args.grade_timeout,
        )
        path = save_results(result, args.output_dir)
        with (path.parent / "completions.jsonl").open("w", encoding="utf-8") as fh:
            for problem, per in zip(problems, texts, strict=True):
                for j, text in enumerate(per):
                    fh.write(json.dumps({"id": problem.id, "sample": j, "completion": text}) + "\n")
        results.append(result)
    return results


def _log_mlflow(args: argparse.Namespace, results: list[BenchmarkResult], out_dir: Path) -> None:
    from dcd_megatron.tracking.telemetry import telemetry_off

    telemetry_off()  # before mlflow is imported: no usage telemetry (docs/tracking.md, "Telemetry")
    import mlflow

    if args.mlflow_tracking_uri:
        mlflow.set_tracking_uri(args.mlflow_tracking_uri)
    mlflow.set_experiment(args.mlflow_experiment)
    with mlflow.start_run(run_name=args.mlflow_run_name):
        mlflow.log_params({
            "checkpoint": args.checkpoint, "protocol": args.protocol, "max_new_tokens": args.max_new_tokens,
            "sample_temperature": args.temperature, "sample_top_p": args.top_p, "sample_n": args.n,
            "seed": args.seed, "template": args.template or "per-benchmark default", "limit": args.limit,
        })
        for result in results:
            log_results(result, lambda m, step: mlflow.log_metrics(m, step=step))
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")


def _model(parser: argparse.ArgumentParser, args: argparse.Namespace, model_loader: ModelLoader | None) -> EvalModel:
    """The model to evaluate: the given loader, --model-loader, or the --checkpoint student."""
    if model_loader is None:
        if args.model_loader is not None:
            model_loader = _import_loader(args.model_loader)
        elif args.checkpoint:
            from dcd_megatron.eval.student import load_student

            model_loader = load_student
        else:
            parser.error("no model: pass --checkpoint RUN_DIR (a dcd-train output_dir or checkpoint) "
                         "or --model-loader MODULE:FUNCTION (a function(args) -> EvalModel)")
    try:
        return model_loader(args)
    except user_error_types() as exc:
        where = f"--checkpoint {args.checkpoint}" if args.checkpoint and not args.model_loader else "loading the model"
        raise EvalUsageError(f"{where}: {exc}") from None


def main(argv: Sequence[str] | None = None, *, model_loader: ModelLoader | None = None) -> int:
    """Run ``dcd-eval``; returns the process exit code (2: a user error, said in one line)."""
    from dcd_megatron.tracking.redact import redacted_console

    with redacted_console():  # no secret (env values, the MLflow URI's password) reaches the console in clear
        return _main(argv, model_loader)


def _main(argv: Sequence[str] | None, model_loader: ModelLoader | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from dcd_megatron.runtime.quiet import quiet_megatron_warnings

    quiet_megatron_warnings(args.verbose, prog="dcd-eval")
    _check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        problems = {entry: read_benchmark(args, entry) for entry in args.benchmark}  # bad files fail before the model loads
        model = _model(parser, args, model_loader)
        out_dir = Path(args.output_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise EvalUsageError(f"--output-dir {out_dir} is a file, not a directory; pass a directory")
        out_dir.mkdir(parents=True, exist_ok=True)
        results: list[BenchmarkResult] = []
        for entry in args.benchmark:
            results.extend(evaluate_benchmark(model, args, entry, problems[entry]))
    except user_error_types() as exc:
        return report_user_error("dcd-eval", exc)

    summary = [{k: v for k, v in r.to_dict().items() if k != "records"} for r in results]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = results_table(results)
    (out_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    if args.mlflow:
        _log_mlflow(args, results, out_dir)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
