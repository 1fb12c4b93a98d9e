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
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from dcd_megatron.lab import data as labdata
from dcd_megatron.lab import scripted, task
from dcd_megatron.lab.arms import ARMS, arm_loss, needs_reference
from dcd_megatron.lab.config import LabConfig, StageConfig, StrongConfig, tiny_lab_config
from dcd_megatron.lab.stats import idle_wall_estimate
from dcd_megatron.score.shards import SCORED
from dcd_megatron.lab.jobs import (
    DistillSpec,
    ReferenceSpec,
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
    from dcd_megatron.tracking.telemetry import telemetry_off

    telemetry_off()  # before mlflow is imported: no usage telemetry (docs/tracking.md, "Telemetry")
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


@dataclass
class Condition:
    """One lab condition: the traces every arm distils from, the run length, and ExAccErr's oracle."""

    name: str
    traces: list[dict]
    traces_path: Path
    stage: StageConfig
    teacher: str | None  # checkpoint of the teacher (None: the scripted one, no ExAccErr)
    description: str = ""
    caches: dict[bool, Path] = field(default_factory=dict)  # only_style -> token cache dir
    paths: dict[bool, Path] = field(default_factory=dict)  # only_style -> traces file
    skipped: set[str] = field(default_factory=set)  # arms with no traces to train on here


@dataclass
class LabRun:
    """What every stage of one lab run shares: the config, paths, tracking and the held-out problems."""

    cfg: LabConfig
    out: Path
    tok_path: Path
    uri: str | None
    lab_id: str
    threads: int
    problems: dict[int, list[str]]
    exclude: set[str]
    rng: random.Random

    def spec(self, name, net, stage, path, seed, out_name, **kw) -> TrainSpec:
        return TrainSpec(name=name, net=net, stage=stage, train_path=str(path), tokenizer=str(self.tok_path),
                         output_dir=str(self.out / "runs" / out_name), seed=seed, seq_length=self.cfg.seq_length,
                         tracking_uri=self.uri, experiment=self.cfg.experiment, threads=self.threads, **kw)


def start_lab(cfg: LabConfig) -> LabRun:
    """Check the settings against the output directory, empty it, make the tokenizer and problem sets."""
    out = Path(cfg.out_dir).resolve()
    if cfg.teacher.checkpoint and Path(cfg.teacher.checkpoint).resolve().is_relative_to(out):
        raise LabError(f"teacher.checkpoint={cfg.teacher.checkpoint} lies inside the output directory {out}, "
                       "which every run empties first: copy it elsewhere or pick another --out")
    prepare_out_dir(out)
    tok_path = task.build_tokenizer(out / "tokenizer")
    uri = resolve_tracking_uri(cfg)
    prepare_tracking_store(uri, cfg.experiment)
    ev = cfg.eval
    problems = labdata.heldout_problems(sorted({*ev.known_k, *ev.new_k, *ev.longer_k}), ev.problems, cfg.data_seed)
    return LabRun(cfg=cfg, out=out, tok_path=tok_path, uri=uri,
                  lab_id=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
                  threads=max(1, (os.cpu_count() or 1) // cfg.workers), problems=problems,
                  exclude={d for ds in problems.values() for d in ds}, rng=random.Random(f"train-{cfg.data_seed}"))


def run_lab(cfg: LabConfig) -> dict:
    """Run every stage; return the results record (also written to `<out_dir>/results.json`)."""
    clock = Stopwatch()
    load_before = os.getloadavg()
    main_cpu0 = time.process_time()
    lab = start_lab(cfg)
    import multiprocessing as mp

    pool = ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn"), initializer=worker_init,
                               initargs=(lab.threads,))
    try:
        teacher, priors, sampling, conditions = _teachers_priors_traces(pool, lab, clock)
        ref_fs = {"teacher": pool.submit(eval_model_job, teacher["checkpoint"], lab.problems, cfg.eval.batch_size)}
        for s, p in priors.items():
            ref_fs[f"prior-seed{s}"] = pool.submit(eval_model_job, p["checkpoint"], lab.problems, cfg.eval.batch_size)
        futures = _submit_arms(pool, lab, conditions, teacher, priors)
        references = {name: _result(f, f"evaluate {name}") for name, f in ref_fs.items()}
        if "strong" in conditions:
            references["strong teacher"] = {"accuracy": scripted.greedy_accuracy(_scripted(cfg.strong), lab.problems),
                                            "cpu_s": 0.0, "kv_max_abs_diff": 0.0}
        records = []
        for (condition, arm, seed), f in futures.items():
            rec = _result(f, f"distill {condition} {arm} seed {seed}")
            records.append(rec)
            print(f"[lab] {condition:>7s} {arm:>12s} seed {seed}: " + " ".join(
                f"k{k} {a['correct'] / a['n']:.2f}" for k, a in rec["accuracy"].items())
                + f" | train {rec['train_seconds']:.0f}s eval {rec['eval_seconds']:.0f}s", flush=True)
        clock.mark("all arms distilled and evaluated")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    cpu = _cpu_record(main_cpu0, teacher, priors, sampling, references, records)
    results = {
        "lab_id": lab.lab_id,
        "config": _plain(cfg),
        "tracking_uri": lab.uri,
        "teacher": teacher,
        "priors": {str(s): p for s, p in priors.items()},
        "sampling": sampling,
        "trace_styles": _count(t["style"] for t in conditions["trained"].traces),
        "conditions": {name: {"description": c.description, "traces": len(c.traces),
                              "trace_styles": _count(t["style"] for t in c.traces),
                              "filtered_traces": sum(t["style"] == cfg.student.prior_style for t in c.traces),
                              "skipped_arms": sorted(c.skipped),
                              "epochs": _epochs(c, cfg.seq_length)}
                       for name, c in conditions.items()},
        "references": references,
        "records": records,
        "timing": {"stages_s": clock.marks, "total_s": time.perf_counter() - clock.t0,
                   "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(),
                   "workers": cfg.workers, "threads_per_worker": lab.threads,
                   "cpu": cpu, "idle_estimate_s": idle_wall_estimate(cpu, cfg.workers)},
    }
    (lab.out / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
    return results


def _teachers_priors_traces(pool, lab: LabRun, clock: Stopwatch):
    """Train the teacher and the priors side by side, sample the traces, make each condition's caches."""
    cfg, data_dir = lab.cfg, lab.out / "data"
    rng = lab.rng
    teacher_rows = labdata.exact_rows(
        labdata.training_digits(cfg.teacher.rows, cfg.teacher.k, lab.exclude, rng), cfg.teacher.styles, rng)
    teacher_path = labdata.write_jsonl(data_dir / "teacher_train.jsonl", teacher_rows)
    prior_seeds = list(cfg.seeds) if cfg.student.prior_per_seed else [cfg.seeds[0]]
    prior_path = labdata.write_jsonl(data_dir / "prior_train.jsonl", labdata.exact_rows(
        labdata.training_digits(cfg.student.prior_rows, cfg.student.prior_k, lab.exclude, rng),
        {cfg.student.prior_style: 1.0}, rng))
    teacher_f = None
    if cfg.teacher.checkpoint is None:
        teacher_f = pool.submit(train_job, lab.spec("teacher", cfg.teacher.net, cfg.teacher.train, teacher_path,
                                                    cfg.data_seed + 1000, "teacher"))
    waiting, prior_fs = list(prior_seeds), {}

    def submit_priors(n: int) -> None:
        for s in [waiting.pop(0) for _ in range(min(n, len(waiting)))]:
            prior_fs[s] = pool.submit(train_job, lab.spec(f"prior-seed{s}", cfg.student.net, cfg.student.prior_train,
                                                          prior_path, s, f"prior-seed{s}"))

    # the priors share the workers with the teacher one at a time, so that the sampling, which
    # waits for the teacher, is queued ahead of the priors still waiting (not behind all of them)
    submit_priors(cfg.workers - 1 if teacher_f is not None else len(waiting))
    while teacher_f is not None and not teacher_f.done():
        running = [f for f in prior_fs.values() if not f.done()]
        if not running and waiting:
            submit_priors(1)
            continue
        wait([teacher_f, *running], return_when=FIRST_COMPLETED)
        if not teacher_f.done():
            submit_priors(cfg.workers - 1 - sum(not f.done() for f in prior_fs.values()))
    if teacher_f is None:
        teacher = {"name": "teacher", "checkpoint": cfg.teacher.checkpoint, "seconds": 0.0, "cpu_s": 0.0,
                   "final": {}, "reused": True}
        clock.mark(f"teacher reused from {cfg.teacher.checkpoint}")
    else:
        teacher = _result(teacher_f, "teacher training")
        clock.mark("teacher trained")
    traces, sampling = sample_traces(pool, cfg, teacher["checkpoint"], lab.exclude, rng,
                                     after_submit=lambda: submit_priors(len(waiting)))
    submit_priors(len(waiting))
    conditions = {"trained": Condition(
        "trained", traces, labdata.write_jsonl(data_dir / "traces.jsonl", traces), cfg.distill, teacher["checkpoint"],
        "the lab's trained teacher, sampled at temperature 1; a short run")}
    clock.mark(f"{len(traces)} teacher traces kept")
    scripted_conditions = (
        ("strong", cfg.strong, "a strong (scripted) teacher, always right when greedy; a long run over fewer traces"),
        ("skip_heavy", cfg.skip_heavy, "a scripted teacher that writes the prior's style only "
         f"{cfg.skip_heavy.styles.get(cfg.student.prior_style, 0):.0%} of the time: it takes the student's untaken "
         "fork with high probability; a long run"),
    )
    for name, sc, description in scripted_conditions:
        if sc.enabled:
            rows = _scripted_traces(sc, cfg, lab.exclude, rng)
            conditions[name] = Condition(name, rows, labdata.write_jsonl(data_dir / f"traces_{name}.jsonl", rows),
                                         sc.distill, None, description)
    priors = {s: _result(f, f"prior seed {s}") for s, f in prior_fs.items()}
    clock.mark("priors trained")
    for c in conditions.values():
        _condition_caches(lab, c)
    return teacher, priors, sampling, conditions


def _condition_caches(lab: LabRun, c: Condition) -> None:
    """The token caches every arm of a condition shares: all traces, and the prior's style only."""
    cfg = lab.cfg
    wanted = {ARMS[a].only_style for a in cfg.arms}
    for only in sorted(wanted):
        rows = [t for t in c.traces if t["style"] == cfg.student.prior_style] if only else c.traces
        if not rows:  # a counted, logged skip: the report lists it
            print(f"[lab] warning: condition {c.name} has no trace in the prior's style "
                  f"{cfg.student.prior_style!r}: its style-filtered arms are skipped", flush=True)
            continue
        name = f"{c.name}{'-' + cfg.student.prior_style if only else ''}"
        path = c.traces_path if not only else labdata.write_jsonl(c.traces_path.with_name(f"traces_{name}.jsonl"), rows)
        cache = lab.out / "cache" / name
        _build_cache(lab.spec("cache", cfg.student.net, c.stage, path, 0, "cache", cache_dir=str(cache), topk=cfg.topk))
        c.caches[only], c.paths[only] = cache, path


def _submit_arms(pool, lab: LabRun, conditions: dict[str, Condition], teacher: dict, priors: dict) -> dict:
    """One distill-and-evaluate job per condition x seed x arm (longer runs first: a shorter tail)."""
    cfg, ev = lab.cfg, lab.cfg.eval
    exposure_digits = _spread(lab.problems, ev.exposure_k, ev.exposure_prompts)
    prior_seeds = sorted(priors)
    futures = {}
    for c in sorted(conditions.values(), key=lambda c: -c.stage.steps):
        weight_rows = labdata.style_sample(c.traces, ev.weight_traces_per_style, cfg.data_seed)
        for seed in cfg.seeds:
            prior = priors[seed if cfg.student.prior_per_seed else prior_seeds[0]]
            for arm in _submission_order(cfg.arms):
                run_name = f"{arm}-seed{seed}" if c.name == "trained" else f"{c.name}-{arm}-seed{seed}"
                only = ARMS[arm].only_style
                if only not in c.caches:
                    c.skipped.add(arm)
                    continue
                path, cache, ref = c.paths[only], c.caches[only], None
                if needs_reference(arm):  # the traces scored by this seed's prior (one job scores, the rest wait)
                    ref_dir = lab.out / "reference" / f"{c.name}-seed{seed}"
                    ref_dir.parent.mkdir(parents=True, exist_ok=True)
                    ref = ReferenceSpec(traces=str(path), out_dir=str(ref_dir), lock=f"{ref_dir}.lock")
                    path, cache = ref_dir / SCORED, lab.out / "cache" / f"{c.name}-reference-seed{seed}"
                train = lab.spec(run_name, cfg.student.net, c.stage, path, seed, run_name,
                                 loss=arm_loss(arm, c.stage.steps), init_checkpoint=prior["checkpoint"],
                                 cache_dir=str(cache), plot_interval=c.stage.steps, topk=cfg.topk)
                futures[(c.name, arm, seed)] = pool.submit(distill_job, DistillSpec(
                    arm=arm, train=train, teacher=c.teacher, prior=prior["checkpoint"], problems=lab.problems,
                    exposure_digits=exposure_digits, exposure_max_len=ev.exposure_max_len,
                    weight_rows=weight_rows, batch_size=ev.batch_size, lab_id=lab.lab_id, condition=c.name,
                    reference=ref))
    return futures


def _cpu_record(main_cpu0: float, teacher: dict, priors: dict, sampling: dict, references: dict, records: list) -> dict:
    """CPU seconds by stage (the idle-machine replay's input)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, reaped by shutdown
    return {
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


def _submission_order(arms: list[str]) -> list[str]:
    """The arms of one seed in submission order: those that read the prior's scoring apart, so the
    second does not wait on the first's scoring while the other worker is busy too."""
    refs = [a for a in arms if needs_reference(a)]
    return refs[:1] + [a for a in arms if not needs_reference(a)] + refs[1:]


def _scripted(sc: StrongConfig) -> scripted.ScriptedTeacher:
    return scripted.ScriptedTeacher(styles=dict(sc.styles), result_eps=dict(sc.result_eps), copy_eps=sc.copy_eps)


def _scripted_traces(sc: StrongConfig, cfg: LabConfig, exclude: set[str], rng: random.Random) -> list[dict]:
    """`sc.count` kept traces of a scripted teacher (drawn in rounds until enough are right)."""
    teacher, kept, round_ = _scripted(sc), [], 0
    while len(kept) < sc.count and round_ < 8:
        digits = labdata.training_digits(2 * (sc.count - len(kept)) + 8, sc.k, exclude, rng)
        rows, _ = scripted.scripted_traces(teacher, digits, seed=cfg.data_seed + round_, topk=cfg.topk)
        kept += rows
        round_ += 1
    return kept[: sc.count]


def _epochs(c: Condition, seq_length: int) -> float:
    """How many passes over the condition's traces a run makes (packed tokens / trace tokens)."""
    tokens = sum(len(t["prompt"]) + len(t["response"]) + 2 for t in c.traces)
    return c.stage.steps * c.stage.global_batch_size * seq_length / max(tokens, 1)


def sample_traces(pool, cfg: LabConfig, teacher_ckpt: str, exclude: set[str], rng: random.Random, after_submit=None):
    """Correct teacher samples until `traces.count` are kept (at most four rounds), in shards per worker;
    `after_submit()` is called once the first round is queued (the lab queues the last priors behind it)."""
    kept: list[dict] = []
    stats = {"drawn": 0, "dropped": {}, "kept_with_wrong_step": 0, "rounds": 0, "seconds": 0.0, "cpu_s": 0.0,
             "kv_max_abs_diff": 0.0}
    rate = 0.85
    while len(kept) < cfg.traces.count and stats["rounds"] < 4:
        need = cfg.traces.count - len(kept)
        digits = labdata.training_digits(math.ceil(need / rate) + 8, cfg.traces.k, exclude, rng)
        shards = [digits[i :: cfg.workers] for i in range(cfg.workers)]
        fs = [pool.submit(sample_job, SampleSpec(teacher_ckpt, shard, seed=1000 * stats["rounds"] + i,
                                                 temperature=cfg.traces.temperature, batch_size=cfg.eval.batch_size,
                                                 topk=cfg.topk))
              for i, shard in enumerate(shards) if shard]
        if after_submit is not None and stats["rounds"] == 0:
            after_submit()
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
