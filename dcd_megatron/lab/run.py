"""Run the drift lab end to end and write its report.

    .venv/bin/python benchmarks/drift_lab.py [--tiny] [--out runs/drift-lab] [--write docs/results.md] [key=value ...]

Stages: held-out problems and exact training rows; teacher and student prior(s) trained side by
side; teacher samples at temperature 1 with log-probs, kept when correct; every arm x seed
distilled from the prior on the same traces and evaluated; one JSON of everything, then the
Markdown report with its plots. Every invocation starts from an empty output directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from dcd_megatron.lab import data as labdata
from dcd_megatron.lab import task
from dcd_megatron.lab.arms import arm_loss
from dcd_megatron.lab.config import LabConfig, tiny_lab_config
from dcd_megatron.lab.stats import idle_wall_estimate
from dcd_megatron.lab.jobs import (
    DistillSpec,
    SampleSpec,
    TrainSpec,
    distill_job,
    eval_model_job,
    sample_job,
    train_job,
    worker_init,
)

MARKER = ".drift-lab"  # an output directory holding this file may be wiped by the next run


class LabError(RuntimeError):
    """A lab stage failed; the message names the stage and where its log is."""


def prepare_out_dir(out: Path) -> None:
    """Start from an empty directory; only ever delete one that a previous lab run made."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise LabError(f"{out} exists, is not empty and was not made by the drift lab: "
                           "pick another --out or empty it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by dcd_megatron.lab.run; deleted by the next run\n")


def resolve_tracking_uri(cfg: LabConfig) -> str | None:
    if not cfg.tracking:
        return None
    from dcd_megatron.tracking import TrackingConfig

    return TrackingConfig(tracking_uri=cfg.tracking_uri).resolved_uri()


def prepare_tracking_store(uri: str | None, experiment: str) -> None:
    """Create the MLflow store and experiment once, here: workers that start together on a new
    SQLite file would race its schema migration ("table _alembic_tmp_experiments already exists")."""
    if uri is None:
        return
    from mlflow.tracking import MlflowClient

    from dcd_megatron.tracking.config import default_artifact_location

    try:
        client = MlflowClient(uri)
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, artifact_location=default_artifact_location(uri))
    except Exception as exc:  # tracking never stops the lab: each job's tracker warns and goes on
        print(f"[lab] warning: could not prepare the MLflow store at {uri}: {exc}", flush=True)


class Stopwatch:
    """Named wall-clock intervals of the lab's stages."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter() - self.t0
        print(f"[lab {self.marks[name]:7.1f}s] {name}", flush=True)


def _result(future: Future, what: str):
    try:
        return future.result()
    except Exception as exc:
        raise LabError(f"lab stage {what!r} failed: {exc}") from exc


def run_lab(cfg: LabConfig) -> dict:
    """Run every stage; return the results record (also written to `<out_dir>/results.json`)."""
    clock = Stopwatch()
    load_before = os.getloadavg()
    main_cpu0 = time.process_time()
    out = Path(cfg.out_dir).resolve()
    if cfg.teacher.checkpoint and Path(cfg.teacher.checkpoint).resolve().is_relative_to(out):
        raise LabError(f"teacher.checkpoint={cfg.teacher.checkpoint} lies inside the output directory {out}, "
                       "which every run empties first: copy it elsewhere or pick another --out")
    prepare_out_dir(out)
    data_dir = out / "data"
    tok_path = task.build_tokenizer(out / "tokenizer")
    uri = resolve_tracking_uri(cfg)
    prepare_tracking_store(uri, cfg.experiment)
    lab_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    threads = max(1, (os.cpu_count() or 1) // cfg.workers)

    # ---- problem sets: evaluation first, training rows avoid it ------------------------------
    ev = cfg.eval
    eval_ks = sorted({*ev.known_k, *ev.new_k, *ev.longer_k})
    problems = labdata.heldout_problems(eval_ks, ev.problems, cfg.data_seed)
    exclude = {d for ds in problems.values() for d in ds}
    rng = random.Random(f"train-{cfg.data_seed}")
    teacher_rows = labdata.exact_rows(
        labdata.training_digits(cfg.teacher.rows, cfg.teacher.k, exclude, rng), cfg.teacher.styles, rng)
    teacher_path = labdata.write_jsonl(data_dir / "teacher_train.jsonl", teacher_rows)
    prior_seeds = list(cfg.seeds) if cfg.student.prior_per_seed else [cfg.seeds[0]]
    prior_path = labdata.write_jsonl(data_dir / "prior_train.jsonl", labdata.exact_rows(
        labdata.training_digits(cfg.student.prior_rows, cfg.student.prior_k, exclude, rng),
        {cfg.student.prior_style: 1.0}, rng))

    def spec(name, net, stage, path, seed, out_name, **kw) -> TrainSpec:
        return TrainSpec(name=name, net=net, stage=stage, train_path=str(path), tokenizer=str(tok_path),
                         output_dir=str(out / "runs" / out_name), seed=seed, seq_length=cfg.seq_length,
                         tracking_uri=uri, experiment=cfg.experiment, threads=threads, **kw)

    import multiprocessing as mp

    pool = ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn"), initializer=worker_init,
                               initargs=(threads,))
    try:
        # ---- teacher and prior(s), side by side ------------------------------------------------
        teacher_f = None
        if cfg.teacher.checkpoint is None:
            teacher_f = pool.submit(train_job, spec("teacher", cfg.teacher.net, cfg.teacher.train, teacher_path,
                                                    cfg.data_seed + 1000, "teacher"))
        prior_fs = {s: pool.submit(train_job, spec(f"prior-seed{s}", cfg.student.net, cfg.student.prior_train,
                                                   prior_path, s, f"prior-seed{s}"))
                    for s in prior_seeds}
        if teacher_f is None:
            teacher = {"name": "teacher", "checkpoint": cfg.teacher.checkpoint, "seconds": 0.0, "cpu_s": 0.0,
                       "final": {}, "reused": True}
            clock.mark(f"teacher reused from {cfg.teacher.checkpoint}")
        else:
            teacher = _result(teacher_f, "teacher training")
            clock.mark("teacher trained")

        # ---- teacher traces ------------------------------------------------------------------
        traces, sampling = sample_traces(pool, cfg, teacher["checkpoint"], exclude, rng)
        traces_path = labdata.write_jsonl(data_dir / "traces.jsonl", traces)
        clock.mark(f"{len(traces)} teacher traces kept")
        priors = {s: _result(f, f"prior seed {s}") for s, f in prior_fs.items()}
        clock.mark("priors trained")

        # ---- the token cache of the traces, built once and shared by every arm --------------
        cache_dir = out / "cache"
        _build_cache(spec("cache", cfg.student.net, cfg.distill, traces_path, 0, "cache", cache_dir=str(cache_dir)))
        weight_rows = labdata.style_sample(traces, ev.weight_traces_per_style, cfg.data_seed)
        exposure_digits = _spread(problems, ev.exposure_k, ev.exposure_prompts)

        # ---- reference models on the held-out problems -----------------------------------------
        ref_fs = {"teacher": pool.submit(eval_model_job, teacher["checkpoint"], problems, ev.batch_size)}
        for s, p in priors.items():
            ref_fs[f"prior-seed{s}"] = pool.submit(eval_model_job, p["checkpoint"], problems, ev.batch_size)

        # ---- every arm x seed -----------------------------------------------------------------
        futures = {}
        for seed in cfg.seeds:
            prior = priors[seed if cfg.student.prior_per_seed else prior_seeds[0]]
            for arm in cfg.arms:
                train = spec(f"{arm}-seed{seed}", cfg.student.net, cfg.distill, traces_path, seed,
                             f"{arm}-seed{seed}", loss=arm_loss(arm, cfg.distill.steps),
                             init_checkpoint=prior["checkpoint"], cache_dir=str(cache_dir),
                             plot_interval=cfg.distill.steps)
                futures[(arm, seed)] = pool.submit(distill_job, DistillSpec(
                    arm=arm, train=train, teacher=teacher["checkpoint"], prior=prior["checkpoint"],
                    problems=problems, exposure_digits=exposure_digits, exposure_max_len=ev.exposure_max_len,
                    weight_rows=weight_rows, batch_size=ev.batch_size, lab_id=lab_id))
        references = {name: _result(f, f"evaluate {name}") for name, f in ref_fs.items()}
        records = []
        for (arm, seed), f in futures.items():
            rec = _result(f, f"distill {arm} seed {seed}")
            records.append(rec)
            print(f"[lab] {arm:>14s} seed {seed}: " + " ".join(
                f"k{k} {a['correct'] / a['n']:.2f}" for k, a in rec["accuracy"].items())
                + f" | train {rec['train_seconds']:.0f}s eval {rec['eval_seconds']:.0f}s", flush=True)
        clock.mark("all arms distilled and evaluated")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, reaped by shutdown
    cpu = {
        "main_s": time.process_time() - main_cpu0,
        "workers_total_s": children.ru_utime + children.ru_stime,
        "worker_init_s": max([p.get("worker_init_cpu_s", 0.0) for p in priors.values()]
                             + [teacher.get("worker_init_cpu_s", 0.0)]),
        "teacher_s": teacher["cpu_s"],
        "priors_s": [p["cpu_s"] for p in priors.values()],
        "sampling_s": sampling["cpu_s"],
        "jobs_s": [r["cpu_s"] for r in references.values()]
        + [r["train_cpu_s"] + r["eval_cpu_s"] for r in records],
    }

    results = {
        "lab_id": lab_id,
        "config": _plain(cfg),
        "tracking_uri": uri,
        "teacher": teacher,
        "priors": {str(s): p for s, p in priors.items()},
        "sampling": sampling,
        "trace_styles": _count(t["style"] for t in traces),
        "references": references,
        "records": records,
        "timing": {"stages_s": clock.marks, "total_s": time.perf_counter() - clock.t0,
                   "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(),
                   "workers": cfg.workers, "threads_per_worker": threads,
                   "cpu": cpu, "idle_estimate_s": idle_wall_estimate(cpu, cfg.workers)},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    return results


def sample_traces(pool, cfg: LabConfig, teacher_ckpt: str, exclude: set[str], rng: random.Random):
    """Correct teacher samples until `traces.count` are kept (at most four rounds), in shards per worker."""
    kept: list[dict] = []
    stats = {"drawn": 0, "dropped": {}, "kept_with_wrong_step": 0, "rounds": 0, "seconds": 0.0, "cpu_s": 0.0,
             "kv_max_abs_diff": 0.0}
    rate = 0.85
    while len(kept) < cfg.traces.count and stats["rounds"] < 4:
        need = cfg.traces.count - len(kept)
        digits = labdata.training_digits(math.ceil(need / rate) + 8, cfg.traces.k, exclude, rng)
        shards = [digits[i :: cfg.workers] for i in range(cfg.workers)]
        fs = [pool.submit(sample_job, SampleSpec(teacher_ckpt, shard, seed=1000 * stats["rounds"] + i,
                                                 temperature=cfg.traces.temperature, batch_size=cfg.eval.batch_size))
              for i, shard in enumerate(shards) if shard]
        got, round_cpu = 0, 0.0
        for f in fs:
            res = _result(f, "teacher sampling")
            kept += res["rows"]
            got += len(res["rows"])
            stats["drawn"] += res["drawn"]
            stats["kept_with_wrong_step"] += res["kept_with_wrong_step"]
            stats["seconds"] = max(stats["seconds"], res["seconds"])
            round_cpu = max(round_cpu, res["cpu_s"])
            stats["kv_max_abs_diff"] = max(stats["kv_max_abs_diff"], res["kv_max_abs_diff"])
            for k, v in res["dropped"].items():
                stats["dropped"][k] = stats["dropped"].get(k, 0) + v
        stats["rounds"] += 1
        stats["cpu_s"] += round_cpu  # shards run side by side: a round costs its slowest shard
        rate = max(got / max(len(digits), 1), 0.05)
    if not kept:
        raise LabError("the teacher produced no correct trace: train it longer (teacher.train.steps)")
    return kept[: cfg.traces.count], stats


def _build_cache(spec: TrainSpec) -> None:
    from dcd_megatron.data import build_caches
    from dcd_megatron.lab.jobs import train_config

    build_caches(train_config(spec).data)


def _spread(problems: dict[int, list[str]], ks: list[int], total: int) -> list[str]:
    """`total` digit strings taken round-robin from the held-out problems of the given ks."""
    pools = [list(problems[k]) for k in ks if k in problems]
    out: list[str] = []
    i = 0
    while len(out) < total and any(pools):
        p = pools[i % len(pools)]
        if p:
            out.append(p.pop())
        i += 1
    return out


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items()))


def _plain(cfg: LabConfig) -> dict:
    from dcd_megatron.configs import to_dict

    return to_dict(cfg)


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


# ---- command line ----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The drift lab: distillation arms vs SFT on digit-sum traces.")
    p.add_argument("overrides", nargs="*", help="dotted LabConfig overrides, e.g. distill.steps=200 seeds=[1,2]")
    p.add_argument("--tiny", action="store_true", help="the test-sized lab (about a minute)")
    p.add_argument("--out", default=None, help="output directory (default: runs/drift-lab; wiped first)")
    p.add_argument("--write", default=None, help="write the Markdown report here (images next to it in img/)")
    p.add_argument("--from-results", default=None, help="only re-render the report from this results.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from dcd_megatron.configs import apply_overrides
    from dcd_megatron.lab.report import write_report

    args = parse_args(argv)
    command = "python benchmarks/drift_lab.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.from_results:
        results = json.loads(Path(args.from_results).read_text())
    else:
        cfg = tiny_lab_config(args.out or "runs/drift-lab-tiny") if args.tiny else LabConfig()
        if args.out:
            cfg.out_dir = args.out
        cfg = apply_overrides(cfg, args.overrides)
        results = run_lab(cfg)
        results["command"] = command.strip()
        Path(cfg.out_dir, "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    if args.write:
        path = write_report(results, Path(args.write))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
