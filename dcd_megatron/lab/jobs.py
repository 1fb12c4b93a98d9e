"""The lab's units of work, run in worker processes: train a model, sample traces, distill and evaluate.

Each job is a module-level function of one picklable spec, so a `ProcessPoolExecutor` (spawn)
can run two at once on two cores. A worker pays the megatron-core import once and keeps a
one-rank gloo group; `train()` re-initialises megatron's parallel state per run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from dcd_megatron.lab.config import NetConfig, StageConfig
from dcd_megatron.loss import DCDConfig

KV_TOLERANCE = 1e-3  # max |logit difference| allowed between the KV-cached copy and megatron


@dataclass
class TrainSpec:
    """One training run of the trainer, as the lab asks for it."""

    name: str
    net: NetConfig
    stage: StageConfig
    train_path: str
    tokenizer: str
    output_dir: str
    seed: int
    seq_length: int
    loss: DCDConfig = field(default_factory=lambda: DCDConfig(method="sft"))
    init_checkpoint: str | None = None
    cache_dir: str | None = None
    tracking_uri: str | None = None  # None: tracking off
    experiment: str = "dcd-drift-lab"
    plot_interval: int = 0
    threads: int = 1
    topk: int = 0  # teacher top-k entries per token read from the traces (data.topk)


def train_config(spec: TrainSpec):
    """The project's TrainConfig for a lab run (single CPU process, fp32, packed samples)."""
    from dcd_megatron.data.config import DataConfig
    from dcd_megatron.model.config import ModelConfig
    from dcd_megatron.runtime.layout import ParallelConfig
    from dcd_megatron.tracking import TrackingConfig
    from dcd_megatron.configs.train import LoopConfig, OptimConfig, RuntimeConfig, TrainConfig

    net, st = spec.net, spec.stage
    return TrainConfig(
        model=ModelConfig(
            num_layers=net.num_layers, hidden_size=net.hidden_size, num_attention_heads=net.num_attention_heads,
            num_query_groups=net.num_query_groups, ffn_hidden_size=net.ffn_hidden_size,
            max_position_embeddings=max(512, spec.seq_length), make_vocab_size_divisible_by=16,
            init_checkpoint=spec.init_checkpoint,
        ),
        parallel=ParallelConfig(),
        data=DataConfig(train_path=spec.train_path, tokenizer=spec.tokenizer, chat_template="plain",
                        seq_length=spec.seq_length, pack=True, num_proc=1, cache_dir=spec.cache_dir,
                        topk=spec.topk),
        loss=spec.loss,
        optim=OptimConfig(lr=st.lr, min_lr=st.min_lr, warmup_steps=st.warmup_steps, weight_decay=0.01, clip_grad=1.0),
        train=LoopConfig(steps=st.steps, global_batch_size=st.global_batch_size, micro_batch_size=st.micro_batch_size,
                         seed=spec.seed, log_interval=max(1, st.steps // 4), eval_interval=0, save_interval=0,
                         keep_checkpoints=1, output_dir=spec.output_dir, resume="never"),
        tracking=TrackingConfig(enabled=spec.tracking_uri is not None, tracking_uri=spec.tracking_uri,
                                experiment=spec.experiment, run_name=spec.name, plot_interval=spec.plot_interval),
        runtime=RuntimeConfig(device="cpu", num_threads=spec.threads),
    )


# ---- worker plumbing --------------------------------------------------------------------------

_INIT_CPU_S = 0.0  # CPU seconds this worker spent starting (imports, process group)


def worker_init(threads: int) -> None:
    """ProcessPoolExecutor initializer: thread count, then a one-rank gloo group with megatron state."""
    global _INIT_CPU_S
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from dcd_megatron.runtime.distributed import ensure_single_process_group, set_threads

    set_threads(threads)
    ensure_single_process_group(torch.device("cpu"))
    _INIT_CPU_S = time.process_time()


_MODELS: dict[str, tuple] = {}


def load_kv(checkpoint: str):
    """(KVCachedGPT, tokenizer, max |logit diff| vs megatron) for a checkpoint, cached per process."""
    if checkpoint not in _MODELS:
        from dcd_megatron.model.inference import load_trained_model
        from dcd_megatron.model.kv_decoder import KVCachedGPT, max_logit_difference

        loaded, tok = load_trained_model(checkpoint, device="cpu")
        kv = KVCachedGPT.from_loaded(loaded)
        diff, _ = max_logit_difference(kv, loaded, tok.bos_id)
        if not diff <= KV_TOLERANCE:
            raise RuntimeError(
                f"the KV-cached decoder disagrees with megatron's GPTModel on {checkpoint} "
                f"(max |logit diff| {diff:.2e} > {KV_TOLERANCE}): model/kv_decoder.py no longer matches the "
                "installed megatron-core's forward; fix it (tests/test_lab_e2e.py shows the check)"
            )
        if len(_MODELS) > 8:
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[checkpoint] = (kv, tok, diff)
    return _MODELS[checkpoint]


def train_job(spec: TrainSpec) -> dict:
    """Train one model; return its checkpoint, wall time and final metrics."""
    import yaml

    from dcd_megatron.configs import to_dict
    from dcd_megatron.train.loop import train

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = train_config(spec)
    # the checkpoint keeps the config text: load_trained_model rebuilds the model from it
    result = train(cfg, config_text=yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return {
        "name": spec.name,
        "checkpoint": str(result.checkpoint),
        "seconds": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "worker_init_cpu_s": _INIT_CPU_S,
        "final": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }


def eval_model_job(checkpoint: str, problems: dict[int, list[str]], batch_size: int) -> dict:
    """Greedy accuracy of a reference model (the teacher or a prior) on the held-out problems."""
    from dcd_megatron.lab.evaluate import greedy_accuracy

    c0 = time.process_time()
    model, tok, diff = load_kv(checkpoint)
    accuracy = greedy_accuracy(model, tok, problems, batch_size=batch_size)
    return {"accuracy": accuracy, "kv_max_abs_diff": diff, "cpu_s": time.process_time() - c0}


@dataclass
class SampleSpec:
    """Teacher samples for a shard of prompts."""

    teacher: str  # checkpoint
    digits: list[str]
    seed: int
    temperature: float
    batch_size: int
    topk: int = 0  # > 0: keep the teacher's top-k per token too (for the entropy gate)


def sample_job(spec: SampleSpec) -> dict:
    """Sample one trace per prompt; keep the well-formed, correct ones with their log-probs."""
    from dcd_megatron.lab import task
    from dcd_megatron.lab.config import trace_tokens
    from dcd_megatron.lab.evaluate import prompt_ids
    from dcd_megatron.lab.sampling import sample_and_score

    t0, c0 = time.perf_counter(), time.process_time()
    model, tok, kv_diff = load_kv(spec.teacher)
    prompts = [prompt_ids(tok, d) for d in spec.digits]
    longest = max(len(d) for d in spec.digits)
    samples = sample_and_score(model, prompts, eos_id=tok.eos_id, max_new_tokens=trace_tokens(longest),
                               temperature=spec.temperature, seed=spec.seed, batch_size=spec.batch_size,
                               topk=spec.topk)
    kept, dropped, wrong_steps = [], {"no_eos": 0, "not_roundtrip": 0, "wrong": 0}, 0
    for digits, (ids, lps, *top) in zip(spec.digits, samples, strict=True):
        if not ids or ids[-1] != tok.eos_id:
            dropped["no_eos"] += 1
            continue
        response = tok.decode(ids[:-1])
        if tok.encode(response) != ids[:-1]:
            dropped["not_roundtrip"] += 1
            continue
        if not task.is_correct(digits, response):
            dropped["wrong"] += 1
            continue
        if task.first_error(digits, response) is not None:
            wrong_steps += 1  # the answer filter keeps it, as the paper's would
        row = {"prompt": task.make_prompt(digits), "response": response,
               "teacher_logprobs": [round(x, 6) for x in lps],
               "answer": str(sum(int(c) for c in digits)), "style": task.style_of(response)}
        if top:
            row["teacher_topk_ids"] = top[0]
            row["teacher_topk_logprobs"] = [[round(x, 6) for x in v] for v in top[1]]
        kept.append(row)
    return {"rows": kept, "drawn": len(spec.digits), "dropped": dropped, "kept_with_wrong_step": wrong_steps,
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "kv_max_abs_diff": kv_diff}


@dataclass
class ReferenceSpec:
    """A condition's traces scored once by a seed's prior (`dcd-score --reference`), for the arms with
    loss.reference=initial; the first job that needs them scores and caches, the others wait on `lock`."""

    traces: str  # the condition's traces (JSONL)
    out_dir: str  # dcd-score --out: out_dir/scored.parquet is the arm's train_path
    lock: str


def ensure_reference(ref: ReferenceSpec, train: TrainSpec) -> dict:
    """Score `ref.traces` with the prior (`train.init_checkpoint`) through the product's scoring job and
    build the token cache `train` reads, once per condition x seed; returns the CPU seconds spent here."""
    from filelock import FileLock

    from dcd_megatron.data import build_caches
    from dcd_megatron.score import ScoreConfig, score
    from dcd_megatron.score.shards import SCORED

    c0 = time.process_time()
    data = train_config(train).data
    with FileLock(ref.lock):
        if not (Path(ref.out_dir) / SCORED).is_file():
            score(ScoreConfig(teacher=train.init_checkpoint, data_path=ref.traces, out_dir=ref.out_dir, data=data,
                              reference=True, device="cpu"), progress=False)
        build_caches(data)
    return {"cpu_s": time.process_time() - c0}


@dataclass
class DistillSpec:
    """One arm x seed: distil from the prior, then evaluate against held-out problems."""

    arm: str
    train: TrainSpec
    teacher: str | None  # the teacher checkpoint, ExAccErr's oracle (None: a scripted teacher, no ExAccErr)
    prior: str
    problems: dict[int, list[str]]
    exposure_digits: list[str]
    exposure_max_len: int
    weight_rows: list[dict]
    batch_size: int
    lab_id: str = ""
    condition: str = "trained"
    reference: ReferenceSpec | None = None  # loss.reference=initial: the traces scored by the prior first


def distill_job(spec: DistillSpec) -> dict:
    """Train the arm, then greedy accuracy by k and style, ExAccErr and weights by style."""
    from dcd_megatron.lab import evaluate as ev

    record: dict = {"arm": spec.arm, "seed": spec.train.seed, "condition": spec.condition}
    scoring = ensure_reference(spec.reference, spec.train) if spec.reference else {"cpu_s": 0.0}
    trained = train_job(spec.train)
    record["train_seconds"] = trained["seconds"]
    record["train_cpu_s"] = trained["cpu_s"] + scoring["cpu_s"]
    record["reference_cpu_s"] = scoring["cpu_s"]
    record["final"] = trained["final"]
    t0, c0 = time.perf_counter(), time.process_time()
    student, tok, diff = load_kv(trained["checkpoint"])
    prior, _, _ = load_kv(spec.prior)
    record["kv_max_abs_diff"] = diff
    record["accuracy"] = ev.greedy_accuracy(student, tok, spec.problems, batch_size=spec.batch_size)
    record["exposure"] = None
    if spec.teacher is not None:
        teacher, _, _ = load_kv(spec.teacher)
        record["exposure"] = ev.exposure_bias(student, teacher, tok, spec.exposure_digits,
                                              max_len=spec.exposure_max_len, seed=spec.train.seed,
                                              batch_size=spec.batch_size)
    loss = spec.train.loss
    record["weights_init"] = ev.weights_by_style(prior, tok, spec.weight_rows, loss, step=0, reference=prior)
    record["weights_final"] = ev.weights_by_style(student, tok, spec.weight_rows, loss, step=spec.train.stage.steps,
                                                  reference=prior)
    record["series"] = metric_series(Path(spec.train.output_dir) / "metrics.jsonl")
    record["eval_seconds"] = time.perf_counter() - t0
    record["eval_cpu_s"] = time.process_time() - c0
    _MODELS.pop(trained["checkpoint"], None)
    if spec.train.tracking_uri:
        record["mlflow_run_id"] = log_evaluation(spec, record)
    return record


SERIES_KEYS = ("ce", "loss", "ess", "weight_mean", "log_ratio_mean", "weight_at_floor_frac",
               "weight_mass_certain", "weight_certain_unlearned")


def metric_series(path: Path) -> dict[str, list[float]]:
    """Per-step training metrics from a run's metrics.jsonl (the keys the report plots)."""
    series: dict[str, list[float]] = {"step": []}
    for key in SERIES_KEYS:
        series[key] = []
    if not path.is_file():
        return series
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "ce" not in rec:
            continue
        series["step"].append(rec["step"])
        for key in SERIES_KEYS:
            series[key].append(float(rec.get(key, math.nan)))
    return series


def eval_metrics(record: dict) -> dict[str, float]:
    """The flat, finite numbers of an evaluation record, named for MLflow."""
    out = {}
    for k, acc in record["accuracy"].items():
        out[f"eval/acc_k{k}"] = acc["correct"] / acc["n"]
        for style, n in acc["styles"].items():
            out[f"eval/style_{style}_k{k}"] = n / acc["n"]
    for key, value in (record["exposure"] or {}).items():
        out[f"eval/exposure_{key}"] = value
    for when in ("init", "final"):
        for style, stats in record[f"weights_{when}"].items():
            for key in ("mean", "branch"):
                out[f"eval/weight_{when}_{style}_{key}"] = stats[key]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def log_evaluation(spec: DistillSpec, record: dict) -> str | None:
    """Add the evaluation to the MLflow run the trainer made (its id is in output_dir/mlflow_run_id)."""
    from dcd_megatron.tracking.telemetry import telemetry_off

    telemetry_off()  # before mlflow is imported: no usage telemetry (docs/tracking.md, "Telemetry")
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    id_file = Path(spec.train.output_dir) / "mlflow_run_id"
    if not id_file.is_file():
        return None
    run_id = id_file.read_text().strip()
    client = MlflowClient(tracking_uri=spec.train.tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, spec.train.stage.steps) for k, v in eval_metrics(record).items()]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])
    for key, value in (("lab.arm", spec.arm), ("lab.seed", str(spec.train.seed)), ("lab.id", spec.lab_id),
                       ("lab.condition", spec.condition)):
        client.set_tag(run_id, key, value)
    return run_id
