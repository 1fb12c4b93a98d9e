"""`dcd-generate`: a teacher checkpoint samples traces from a prompt set -> kept (correct) traces that dcd-train reads.

    dcd-generate --teacher CKPT --prompts FILE|BENCHMARK=FILE --out DIR
                 (--config STUDENT.yaml | --recipe R | --student-tokenizer PATH)
                 [--n 8] [--temperature 0.7] [--top-p 0.95] [--top-k 0] [--max-new-tokens N]
                 [--logprob-top-k K] [--seed S] [--template T] [data.key=value ...]

Prompts are encoded by the student's data pipeline (its chat template and BOS) and every sampled
token's log-prob is that of the distribution it was drawn from (temperature, top-k, then top-p,
renormalised), so no dcd-score step is needed. Runs as one process or under torchrun (data
parallel over shards, each rank holding the whole teacher). A rerun with the same --out resumes.
Output: DIR/traces.parquet (kept), DIR/samples.parquet (all), DIR/generate_summary.json.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dcd_megatron.recipes import RECIPES

    p = argparse.ArgumentParser(prog="dcd-generate", description=__doc__.split("\n")[0],
                                epilog="Overrides: data.key=value for the student's data settings (e.g. data.chat_template=chatml).")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (dcd-convert output, or a dcd-train run/iter dir)")
    p.add_argument("--prompts", required=True,
                   help="prompt file (JSONL/JSON/Parquet with answers): FILE (gsm8k rows) or BENCHMARK=FILE, e.g. math500=m.jsonl")
    p.add_argument("--out", required=True, help="output directory (DIR/traces.parquet)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="the student's training YAML (its data section fixes the prompt ids)")
    src.add_argument("--recipe", choices=sorted(RECIPES), help="take the student's data settings from a recipe")
    p.add_argument("--student-tokenizer", help="the student's tokenizer (overrides the config's data.tokenizer)")
    p.add_argument("--teacher-tokenizer", help="the teacher's tokenizer, checked against the student's "
                   "(default: the path its checkpoint records)")
    p.add_argument("--template", help="prompt template: math_cot, plain, or a format string with {question} "
                   "(default: the benchmark's)")
    p.add_argument("--backend", default="megatron", help="megatron (default; CPU and GPU)")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=8,
                   help="samples per prompt (under torchrun write --num-samples: torchrun reads --n as one of its own)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--logprob-top-k", type=int, default=0, help="also store the top-K of the sampling distribution per token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-per-prompt", type=int, help="keep at most this many correct samples of a prompt")
    p.add_argument("--prompts-per-shard", type=int, default=64, help="the unit of resumption")
    p.add_argument("--batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument("--limit", type=int, help="the first N prompts only")
    p.add_argument("--grade-workers", type=int, default=2, help="processes grading answers (0 = in this one)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--mlflow", action=argparse.BooleanOptionalAction, default=False,
                   help="log the settings, the summary's counts and pass@1/pass@n to an MLflow run")
    p.add_argument("--mlflow-tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or ./mlruns")
    p.add_argument("--mlflow-experiment", default="dcd-generate")
    p.add_argument("--mlflow-run-name", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show megatron-core's own start-up warnings")
    p.add_argument("overrides", nargs="*", help="data.key=value overrides")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace):
    """The GenerateConfig: the student's data settings as dcd-score finds them, then the sampling flags."""
    from dcd_megatron.cli.score import student_data
    from dcd_megatron.generate import GenerateConfig

    return GenerateConfig(
        teacher=args.teacher, prompts=args.prompts, out_dir=args.out, data=student_data(args, prog="dcd-generate"),
        teacher_tokenizer=args.teacher_tokenizer, template=args.template, n=args.n, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens, logprob_top_k=args.logprob_top_k,
        seed=args.seed, max_per_prompt=args.max_per_prompt, prompts_per_shard=args.prompts_per_shard,
        batch_size=args.batch_size, limit=args.limit, grade_workers=args.grade_workers, device=args.device,
        backend=args.backend,
    )


SETTINGS = ("n", "temperature", "top_p", "top_k", "max_new_tokens", "logprob_top_k", "seed", "max_per_prompt",
            "teacher", "benchmark", "problems", "template", "backend")


def log_mlflow(args: argparse.Namespace, summary: dict, out_dir) -> None:
    """One MLflow run: the sampling settings as params, the counts and pass@k as metrics, the summary file."""
    from dcd_megatron.tracking.telemetry import telemetry_off

    telemetry_off()  # before mlflow is imported: no usage telemetry (docs/tracking.md, "Telemetry")
    import mlflow

    if args.mlflow_tracking_uri:
        mlflow.set_tracking_uri(args.mlflow_tracking_uri)
    mlflow.set_experiment(args.mlflow_experiment)
    with mlflow.start_run(run_name=args.mlflow_run_name):
        mlflow.log_params({k: summary.get(k) for k in SETTINGS})
        metrics = {k: v for k, v in summary.items() if k in ("samples", "kept") or k.startswith("pass@")}
        metrics.update({f"rejected_{k}": v for k, v in summary["rejected"].items()})
        mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(out_dir / "generate_summary.json"))


def main(argv: list[str] | None = None) -> int:
    import os

    from dcd_megatron.cli.errors import report_user_error, user_error_types
    from dcd_megatron.generate import generate_traces
    from dcd_megatron.runtime import distributed
    from dcd_megatron.runtime.quiet import quiet_megatron_warnings

    args = parse_args(argv)
    quiet_megatron_warnings(args.verbose, prog="dcd-generate")
    rank = int(os.environ.get("RANK", "0"))
    try:
        result = generate_traces(resolve_config(args), progress=not args.no_progress)
    except user_error_types() as exc:
        return report_user_error("dcd-generate", exc, rank if "RANK" in os.environ else None)
    finally:
        distributed.shutdown()
    if rank == 0 and args.mlflow:
        log_mlflow(args, result.summary, result.traces.parent)
    if rank == 0:
        print(f"kept traces: {result.traces}")
        print(f"train on them: dcd-train ... data.train_path={result.traces}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
