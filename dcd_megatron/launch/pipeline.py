"""One NeMo-Run experiment from a teacher and prompts (or raw traces) to a distilled Hugging Face student:

    generate (dcd-generate) | score (dcd-score) [-> reference (dcd-score --reference)] -> train (dcd-train)
        -> eval (dcd-eval) -> export (dcd-convert mcore-to-hf)

    python recipes/pipeline.py --factory tiny_cpu teacher=CKPT prompts=gsm8k=FILE benchmarks=gsm8k=FILE,math500=FILE \
        work_dir=runs/pipeline run.executor=local run.executor.ntasks_per_node=2 -y
    python recipes/pipeline.py --factory tiny_cpu teacher=CKPT traces=TRACES ...   # bring your own traces

With `prompts=` the first stage samples the teacher's traces and keeps the correct ones
(`generated/traces.parquet`, docs/generation.md); with `traces=` it scores the given traces.

Four or five jobs with dependencies in one `run.Experiment` (on Slurm: sbatch --dependency=afterok; on
the local and Docker executors NeMo-Run runs them one after the other). Score and train get the
executor as given (torchrun / one task per GPU); eval and export run as one process on one node.
Every stage resumes or skips when the experiment is rerun with the same work_dir: scoring keeps
its finished shards, training resumes from its newest checkpoint (train.resume=auto), eval and
export skip when their stamp names the checkpoint they would read. When the student starts from
`model.init_checkpoint` and its loss reads the initial student (`loss.reference=initial|auto`),
a reference stage scores the traces with that checkpoint (`student_ref_logprobs`) before training.
The layout under work_dir: `generated/traces.parquet` or `scored/scored.parquet`, `reference/scored.parquet`, `run/` (checkpoints,
metrics), `eval/summary.json`, `hf/`.
"""

import json
import os
import sys
from pathlib import Path

import nemo_run as run

from dcd_megatron.configs.train import LoopConfig, OptimConfig, RuntimeConfig
from dcd_megatron.configs.overrides import ConfigError
from dcd_megatron.data.config import DataConfig
from dcd_megatron.generate.config import GenerateConfig
from dcd_megatron.launch import nemo
from dcd_megatron.loss import DCDConfig
from dcd_megatron.model.config import ModelConfig
from dcd_megatron.runtime.layout import ParallelConfig
from dcd_megatron.score.config import ScoreConfig
from dcd_megatron.tracking import TrackingConfig

STAGES = ("generate", "score", "reference", "train", "eval", "export")


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _latest_checkpoint(run_dir: str) -> str:
    from dcd_megatron.checkpoint import find_latest

    latest = find_latest(Path(run_dir) / "checkpoints")
    if latest is None:
        print(f"dcd pipeline: error: no complete checkpoint under {run_dir}/checkpoints: "
              "the train stage did not finish; rerun the experiment", file=sys.stderr)
        raise SystemExit(2)
    return str(latest)


def _stamp(path: Path, checkpoint: str) -> bool:
    """True when `path` records that this stage already ran on `checkpoint`."""
    try:
        return json.loads(path.read_text())["checkpoint"] == checkpoint
    except (OSError, ValueError, KeyError):
        return False


# --- the stages (each is a NeMo-Run job: run.Partial of one of these) --------------------------


def score_stage(cfg: ScoreConfig) -> None:
    """dcd-score: the teacher's log-probs for every trace token (resumes from finished shards)."""
    from dcd_megatron.runtime.quiet import quiet_megatron_warnings

    quiet_megatron_warnings(prog="dcd-score")
    from dcd_megatron.cli.errors import report_user_error, user_error_types
    from dcd_megatron.runtime import distributed
    from dcd_megatron.score import score

    try:
        result = score(cfg, progress=False)
    except user_error_types() as exc:
        raise SystemExit(report_user_error("dcd-score", exc, _rank())) from None
    finally:
        distributed.shutdown()
    if _rank() == 0:
        print(f"scored dataset: {result.output}")


def generate_stage(cfg: GenerateConfig) -> None:
    """dcd-generate: the teacher's traces from the prompts, kept when correct (resumes from finished shards)."""
    from dcd_megatron.runtime.quiet import quiet_megatron_warnings

    quiet_megatron_warnings(prog="dcd-generate")
    from dcd_megatron.cli.errors import report_user_error, user_error_types
    from dcd_megatron.generate import generate_traces
    from dcd_megatron.runtime import distributed

    try:
        result = generate_traces(cfg, progress=False)
    except user_error_types() as exc:
        raise SystemExit(report_user_error("dcd-generate", exc, _rank())) from None
    finally:
        distributed.shutdown()
    if _rank() == 0:
        print(f"kept traces: {result.traces}")


def eval_stage(run_dir: str, out_dir: str, benchmarks: list[str], args: list[str]) -> None:
    """dcd-eval on the newest checkpoint of `run_dir`; skipped if `out_dir` has its results."""
    from dcd_megatron.eval.cli import main as dcd_eval

    checkpoint = _latest_checkpoint(run_dir)
    stamp = Path(out_dir) / "pipeline-stamp.json"
    if _stamp(stamp, checkpoint) and (Path(out_dir) / "summary.json").is_file():
        print(f"eval: {out_dir} already has the results of {checkpoint}; skipped")
        return
    argv = ["--checkpoint", checkpoint, "--output-dir", out_dir, *args]
    for benchmark in benchmarks:
        argv += ["--benchmark", benchmark]
    code = dcd_eval(argv)
    if code:
        raise SystemExit(code)
    stamp.write_text(json.dumps({"checkpoint": checkpoint}) + "\n")


def export_stage(run_dir: str, out_dir: str) -> None:
    """dcd-convert mcore-to-hf of the newest checkpoint; skipped if `out_dir` is its export."""
    from dcd_megatron.cli.convert import main as dcd_convert

    checkpoint = _latest_checkpoint(run_dir)
    stamp = Path(out_dir) / "pipeline-stamp.json"
    if _stamp(stamp, checkpoint):
        print(f"export: {out_dir} is already the export of {checkpoint}; skipped")
        return
    code = dcd_convert(["mcore-to-hf", "--checkpoint", checkpoint, "--out", out_dir, "--overwrite"])
    if code:
        raise SystemExit(code)
    stamp.write_text(json.dumps({"checkpoint": checkpoint}) + "\n")


# --- the experiment ---------------------------------------------------------------------------


def _one_process(executor):
    """The executor for eval/export: one process on one node (no torchrun)."""
    single = executor.clone()
    single.ntasks_per_node = 1
    if isinstance(single, run.SlurmExecutor):
        single.nodes = 1
        single.gpus_per_node = 1
        single.exclusive = None
        single.mem = None
        single.time = "01:00:00"
    else:
        single.launcher = None
    return single


def add_jobs(exp: run.Experiment, ctx, work_dir: str, first: tuple[str, run.Partial], train_task: run.Partial,
             benchmarks: list[str], eval_args: list[str], reference_cfg: run.Config | None = None) -> dict[str, str]:
    """Add the jobs to an open experiment, each depending on the one before; their ids. `first`: the
    stage that makes the training data, ("generate" | "score", its job)."""
    executor = ctx.executor
    single = _one_process(executor)
    run_dir = train_task.train.output_dir
    ids = {}
    name, job = first
    before_train = ids[name] = exp.add(job, executor=executor.clone(), name=name, tail_logs=not ctx.detach)
    if reference_cfg is not None:
        before_train = ids["reference"] = exp.add(run.Partial(score_stage, cfg=reference_cfg),
                                                  executor=executor.clone(), name="reference",
                                                  tail_logs=not ctx.detach, dependencies=[ids[name]])
    ids["train"] = exp.add(train_task, executor=executor.clone(), name="train", tail_logs=not ctx.detach,
                           dependencies=[before_train])
    if benchmarks:
        ids["eval"] = exp.add(
            run.Partial(eval_stage, run_dir=run_dir, out_dir=f"{work_dir}/eval", benchmarks=list(benchmarks),
                        args=list(eval_args)),
            executor=single.clone(), name="eval", tail_logs=not ctx.detach, dependencies=[ids["train"]])
    ids["export"] = exp.add(run.Partial(export_stage, run_dir=run_dir, out_dir=f"{work_dir}/hf"),
                            executor=single.clone(), name="export", tail_logs=not ctx.detach,
                            dependencies=[ids["train"]])
    return ids


def pipeline(  # long: NeMo-Run's command line is this signature; the body wires the stages
    ctx: run.cli.RunContext,
    teacher: str,
    model: ModelConfig,
    parallel: ParallelConfig,
    data: DataConfig,
    loss: DCDConfig,
    optim: OptimConfig,
    train: LoopConfig,  # noqa: A002  (dcd-train's section name)
    tracking: TrackingConfig,
    runtime: RuntimeConfig,
    traces: str = "",
    prompts: str = "",
    work_dir: str = "runs/pipeline",
    benchmarks: str = "",
    score_top_k: int = 0,
    score_temperature: float = 1.0,
    eval_limit: int = 0,
    eval_max_new_tokens: int = 512,
    eval_protocol: str = "greedy",
    generate_n: int = 8,
    generate_temperature: float = 0.7,
    generate_top_p: float = 0.95,
    generate_top_k: int = 0,
    generate_max_new_tokens: int = 1024,
    generate_logprob_top_k: int = 0,
    generate_template: str = "",
    generate_seed: int = 0,
) -> None:
    """Generate (or score) traces with a teacher, train the student on them, evaluate it, export it to HF.

    teacher: the teacher checkpoint (dcd-convert hf-to-mcore output); prompts: a prompt file with answers
    (FILE or BENCHMARK=FILE, for dcd-generate with the generate_* settings), or traces: raw traces to score;
    the sections are the student's training config (--factory RECIPE, or --yaml train.yaml);
    benchmarks: dcd-eval's NAME[=SOURCE] entries, comma-separated (empty: no eval job). work_dir holds every output.
    """
    if isinstance(ctx.executor, run.LocalExecutor):
        work_dir = str(Path(work_dir).absolute())
    benchmark_list = [b.strip() for b in benchmarks.split(",") if b.strip()]
    sections = {"model": model, "parallel": parallel, "data": data, "loss": loss, "optim": optim,
                "train": train, "tracking": tracking, "runtime": runtime}
    student = nemo.train_config(**sections)  # the student's config, checked here
    if bool(traces) == bool(prompts):
        raise ConfigError("give the pipeline prompts=FILE (dcd-generate makes the traces) or traces=TRACES "
                          "(dcd-score scores them), one of the two")
    student.train.output_dir = f"{work_dir}/run"
    if prompts:
        gen = GenerateConfig(
            teacher=teacher, prompts=prompts, out_dir=f"{work_dir}/generated", data=student.data, n=generate_n,
            temperature=generate_temperature, top_p=generate_top_p, top_k=generate_top_k,
            max_new_tokens=generate_max_new_tokens, logprob_top_k=generate_logprob_top_k,
            template=generate_template or None, seed=generate_seed, device=student.runtime.device)
        first = ("generate", run.Partial(generate_stage, cfg=nemo.to_run_config(gen)))
        student.data.train_path = f"{work_dir}/generated/traces.parquet"
    else:
        score_cfg = ScoreConfig(teacher=teacher, data_path=traces, out_dir=f"{work_dir}/scored", data=student.data,
                                top_k=score_top_k, temperature=score_temperature, device=student.runtime.device)
        first = ("score", run.Partial(score_stage, cfg=nemo.to_run_config(score_cfg)))
        student.data.train_path = f"{work_dir}/scored/scored.parquet"
    reference_cfg = None
    if student.model.init_checkpoint and loss.reference in ("initial", "auto") and loss.method != "sft":
        reference_cfg = ScoreConfig(teacher=student.model.init_checkpoint, data_path=student.data.train_path,
                                    out_dir=f"{work_dir}/reference", data=student.data, reference=True,
                                    device=student.runtime.device)
        student.data.train_path = f"{work_dir}/reference/scored.parquet"
    train_task = run.Partial(nemo.train, **nemo.sections(student))
    eval_args = ["--protocol", eval_protocol, "--max-new-tokens", str(eval_max_new_tokens), "--no-progress"]
    if eval_limit:
        eval_args += ["--limit", str(eval_limit)]
    if student.runtime.device == "cpu":
        eval_args += ["--device", "cpu"]
    with run.Experiment(ctx.name, executor=ctx.executor, log_level="WARN") as exp:
        add_jobs(exp, ctx, work_dir, first, train_task, benchmark_list, eval_args,
                 nemo.to_run_config(reference_cfg) if reference_cfg is not None else None)
        result = nemo.run_experiment(exp, dryrun=ctx.dryrun, detach=ctx.detach)
    print(result if ctx.dryrun else f"{ctx.name}: {result}")


def _register():
    entry = run.cli.entrypoint(namespace=nemo.NAMESPACE, run_ctx_cls=nemo.DcdRunContext, type="experiment",
                               default_executor=nemo.local(),
                               help="generate|score -> [reference ->] train -> eval -> export as one NeMo-Run experiment")
    entry(pipeline)
    nemo.register_recipes(pipeline)


_register()
