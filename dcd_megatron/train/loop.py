"""The training job: build everything from a TrainConfig, then step, log, validate and checkpoint.

Read top to bottom, one batch goes: trace files -> token cache -> packed micro-batches ->
GPTModel (one pipeline stage per rank) -> DCD loss -> megatron's schedule -> global weight
normalisation -> optimizer -> metrics on rank 0 -> MLflow and the console.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dcd_megatron.configs import to_dict
from dcd_megatron.loss.report import KNOWLEDGE_KEYS, knowledge_summary
from dcd_megatron.train.config import TrainConfig

log = logging.getLogger("dcd_megatron.train")


@dataclass
class TrainResult:
    """What a finished run reports (on every rank)."""

    step: int
    metrics: dict
    output_dir: Path
    checkpoint: Path | None
    run_description: str
    # {metric: (steps, values)} of the knowledge / fork diagnostics (dcd_megatron.loss.report.KNOWLEDGE_KEYS)
    history: dict = field(default_factory=dict)


def _set_threads(cfg: TrainConfig, local_world: int) -> None:
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))


def _groups():
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_group(),
        "cp": ps.get_context_parallel_group(),
        "dp": ps.get_data_parallel_group(),
        "dp_cp": ps.get_data_parallel_group(with_context_parallel=True),
        "pp": ps.get_pipeline_model_parallel_group(),
        "first_stage": ps.is_pipeline_first_stage(),
        "last_stage": ps.is_pipeline_last_stage(),
        "dp_rank": ps.get_data_parallel_rank(),
        "cp_rank": ps.get_context_parallel_rank(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        # One source all ranks agree on: the last global rank sits on the last pipeline stage
        # (megatron's default rank order puts pp outermost; Megatron-LM logs from it too).
        # get_pipeline_model_parallel_last_rank() differs per PP group and deadlocks at DP > 1.
        "last_stage_rank0": torch.distributed.get_world_size() - 1,
    }


def _share_metrics(metrics: dict | None, src: int) -> dict:
    """Send the last stage's metrics (computed on global rank `src`) to every rank."""
    box = [metrics]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0] or {}


def train(cfg: TrainConfig, config_text: str | None = None) -> TrainResult:
    """Run one training job described by `cfg`; returns the final metrics."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dcd_megatron.data import (
        MicroBatchIterator,
        TokenizerError,
        build_caches,
        load_tokenizer,
        load_trace_data,
        split_for_context_parallel,
    )
    from dcd_megatron.loss import make_loss_func, reduce_reports, rescale_grads_for_global_weight_mean
    from dcd_megatron.model.builder import build_gpt_model, return_hidden_states, transformer_config
    from dcd_megatron.model.fp8 import check_fp8, current_capability
    from dcd_megatron.runtime import distributed as rt
    from dcd_megatron.runtime.layout import LayoutError, validate_layout
    from dcd_megatron.tracking import MetricHistory, ProgressPrinter, Tracker
    from dcd_megatron.train import checkpoint as ckpt
    from dcd_megatron.train.optim import build_optimizer, build_scheduler
    from dcd_megatron.train.step import make_forward_step

    import yaml

    # The config travels with every checkpoint (meta.json), so a checkpoint is self-describing.
    config_text = config_text or yaml.safe_dump(to_dict(cfg), sort_keys=False)
    device = rt.resolve_device(cfg.runtime.device)
    has_te = device.type == "cuda" and rt.has_transformer_engine()
    # Everything that can be checked before processes talk to each other is checked here.
    check_fp8(cfg.model.fp8, cfg.model.fp8_recipe, has_te=has_te, capability=current_capability())
    info = rt.init_process_group(device, cfg.runtime.timeout_minutes)
    _set_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or min(info.world_size, os.cpu_count() or 1))
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type)
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise TokenizerError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids "
            f"({cfg.data.tokenizer}): larger ids would index past the embedding; unset model.vocab_size or raise it"
        )
    layout = validate_layout(
        cfg.parallel,
        world_size=info.world_size,
        num_layers=cfg.model.num_layers,
        num_attention_heads=cfg.model.num_attention_heads,
        num_query_groups=cfg.model.query_groups,
        ffn_hidden_size=cfg.model.ffn_size,
        seq_length=cfg.data.seq_length,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        has_te=has_te,
    )
    if layout.cp > 1 and cfg.data.pack:
        raise LayoutError(
            "data.pack=true with parallel.cp > 1 is not supported yet (packed documents would need "
            "per-document context-parallel splits); set data.pack=false or parallel.cp=1"
        )
    rt.init_model_parallel(layout, cfg.train.seed)
    g = _groups()
    is_logger = info.rank == 0
    output_dir = Path(cfg.train.output_dir)
    ckpt_root = output_dir / "checkpoints"
    if is_logger:
        output_dir.mkdir(parents=True, exist_ok=True)

    # ---- data: tokenize once (rank 0), everyone memory-maps the cache ------------------
    data_cfg = cfg.data
    if not data_cfg.cache_dir:
        data_cfg = dataclasses.replace(data_cfg, cache_dir=str(output_dir / "cache"))
    if is_logger:
        build_caches(data_cfg, tokenizer)
    torch.distributed.barrier()
    data = load_trace_data(data_cfg, tokenizer, build=False)
    train_samples, valid_samples = data.train, data.valid
    _check_teacher_coverage(cfg, data.train_meta)
    num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.dp)

    # ---- model, optimizer, scheduler ---------------------------------------------------
    padded_vocab = cfg.model.padded_vocab_size(vocab_size, layout.tp)
    tconfig = transformer_config(
        cfg.model, layout, sequence_parallel=cfg.parallel.sequence_parallel, on_cpu=device.type == "cpu"
    )
    model = build_gpt_model(
        cfg.model,
        tconfig,
        padded_vocab_size=padded_vocab,
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=g["first_stage"],
        post_process=g["last_stage"],
        use_te=has_te,
    ).to(device)
    if cfg.loss.chunked:  # the loss makes the logits itself, a chunk of tokens at a time
        return_hidden_states(model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.optim.distributed_optimizer
    )
    model = DistributedDataParallel(tconfig, ddp_config, model)
    chunks = [model]
    # megatron's schedule calls this after the last backward: it finishes the DP gradient
    # all-reduce and divides by the global token count (calculate_per_token_loss=True).
    tconfig.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer(cfg.optim, chunks, params_dtype=cfg.model.params_dtype, on_cpu=device.type == "cpu")
    scheduler = build_scheduler(cfg.optim, optimizer, cfg.train.steps)

    start_step, consumed = 0, 0
    resume_from = ckpt.resolve_resume(cfg.train.resume, ckpt_root)
    if resume_from is not None:
        meta = ckpt.load_checkpoint(resume_from, chunks, optimizer, scheduler)
        start_step, consumed = int(meta["step"]), int(meta["consumed_samples"])
        if is_logger:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
    elif cfg.model.init_checkpoint:
        init_from = _checked_init_checkpoint(cfg)
        ckpt.load_checkpoint(init_from, chunks, None, None, load_optimizer=False)
        if is_logger:
            print(f"initialised the student from {init_from}", flush=True)

    if start_step >= cfg.train.steps and is_logger:
        print(f"{resume_from} is already at step {start_step} of train.steps={cfg.train.steps}: "
              "nothing to train (raise train.steps, or use a new train.output_dir)", flush=True)
    train_iter = MicroBatchIterator(
        train_samples,
        micro_batch_size=cfg.train.micro_batch_size,
        num_microbatches=num_microbatches,
        dp_rank=g["dp_rank"],
        dp_size=layout.dp,
        seed=cfg.train.seed,
        consumed_samples=consumed,
        shuffle=cfg.data.shuffle,
    )
    cp_split = None
    if layout.cp > 1:
        cp_rank, cp_size = g["cp_rank"], layout.cp
        cp_split = lambda batch: split_for_context_parallel(batch, cp_rank, cp_size)  # noqa: E731
    forward_backward = get_forward_backward_func()
    seq_len = cfg.data.seq_length // layout.cp
    packed = cfg.data.pack

    def run_step(data_iter, step: int, n_micro: int, forward_only: bool):
        loss_func = make_loss_func(cfg.loss, tp_group=g["tp"], cp_group=g["cp"] if layout.cp > 1 else None, step=step)
        forward_step = make_forward_step(
            loss_func, packed=packed, use_te=has_te, device=device, cp_split=cp_split, hidden_states=cfg.loss.chunked
        )
        return forward_backward(
            forward_step_func=forward_step,
            data_iterator=data_iter,
            model=chunks,
            num_microbatches=n_micro,
            seq_length=seq_len,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    # ---- tracking ------------------------------------------------------------------------
    tracker = Tracker(cfg.tracking, is_logging_rank=is_logger)
    resolved = to_dict(cfg)
    tracker.start(resolved, config_text, output_dir)
    if is_logger:
        print(f"layout tp={layout.tp} pp={layout.pp} cp={layout.cp} dp={layout.dp}, "
              f"{num_microbatches} micro-batches of {cfg.train.micro_batch_size} x {cfg.data.seq_length} tokens; "
              f"{len(train_samples)} training samples; {tracker.describe()}", flush=True)
    printer = ProgressPrinter(cfg.train.steps, cfg.train.log_interval, start_step=start_step)
    metrics_file = output_dir / "metrics.jsonl"
    history = MetricHistory(HISTORY_KEYS)
    if is_logger and start_step > 0:
        history.load_jsonl(metrics_file, start_step)  # the curves go on from the steps before the resume
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
    last_metrics: dict = {}
    last_ckpt = resume_from
    final_step = start_step
    status = "FAILED"
    stop_signal = StopSignal(device)

    try:
        for step in range(start_step, cfg.train.steps):
            t0 = time.perf_counter()
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            reports = run_step(train_iter, step, num_microbatches, forward_only=False)
            factor = rescale_grads_for_global_weight_mean(
                chunks, reports if g["last_stage"] else [], pp_group=g["pp"], dp_cp_group=g["dp_cp"]
            )
            ok, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            metrics = reduce_reports(reports, dp_cp_group=g["dp_cp"]) if g["last_stage"] else None
            metrics = _share_metrics(metrics, g["last_stage_rank0"])
            elapsed = time.perf_counter() - t0
            metrics.update(
                lr=optimizer.param_groups[0]["lr"],
                grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                update_skipped=float(not ok),
                tokens_per_s=tokens_per_step / elapsed,
                step_time_s=elapsed,
            )
            done = step + 1
            last_metrics = metrics
            if is_logger:
                scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                tracker.log_metrics(scalars, step=done)
                with open(metrics_file, "a") as fh:
                    fh.write(json.dumps({"step": done, **scalars}) + "\n")
                history.add(done, scalars)
                if done % cfg.train.log_interval == 0 or done == cfg.train.steps:
                    printer.print(done, metrics)
                if cfg.tracking.plot_interval and (done % cfg.tracking.plot_interval == 0 or done == cfg.train.steps):
                    _log_plots(tracker, done, metrics, history)
            if cfg.train.eval_interval and valid_samples is not None and (
                done % cfg.train.eval_interval == 0 or done == cfg.train.steps
            ):
                val = evaluate(run_step, chunks, valid_samples, cfg, layout, g, num_microbatches, step=done)
                if is_logger:
                    tracker.log_metrics(val, step=done)
                    with open(metrics_file, "a") as fh:
                        fh.write(json.dumps({"step": done, **val}) + "\n")
                    print(f"step {done}: " + " ".join(f"{k} {v:.4f}" for k, v in val.items()), flush=True)
                last_metrics.update(val)
            stop = (cfg.train.stop_after and done >= cfg.train.stop_after) or stop_signal.requested()
            if done < cfg.train.steps and (stop or (cfg.train.save_interval and done % cfg.train.save_interval == 0)):
                last_ckpt = _save(ckpt, ckpt_root, done, chunks, optimizer, scheduler, train_iter, cfg, config_text, padded_vocab)
            if stop and done < cfg.train.steps:
                final_step = done
                if is_logger:
                    why = "a stop signal" if stop_signal.received else f"train.stop_after={cfg.train.stop_after}"
                    print(f"stopping after step {done} ({why}); resume with train.resume=auto", flush=True)
                break
        else:
            final_step = cfg.train.steps
            if start_step < cfg.train.steps or last_ckpt is None:
                last_ckpt = _save(ckpt, ckpt_root, cfg.train.steps, chunks, optimizer, scheduler, train_iter, cfg, config_text, padded_vocab)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if is_logger and last_metrics:
            final = {"step": final_step, "status": status, "steps_planned": cfg.train.steps,
                     **{k: v for k, v in last_metrics.items() if isinstance(v, (int, float))}}
            (output_dir / "final_metrics.json").write_text(json.dumps(final, indent=1))
        tracker.finish(status)
        stop_signal.restore()
    if is_logger:
        for line in knowledge_summary(history.curves()):
            print(line, flush=True)
    return TrainResult(
        step=final_step,
        metrics=last_metrics,
        output_dir=output_dir,
        checkpoint=last_ckpt,
        run_description=tracker.describe(),
        history=history.curves(),
    )


# Metrics whose history a run keeps (curve plot, end-of-run summary): the knowledge / fork
# diagnostics and certain_token_frac, the level weight_mass_certain has under plain SFT.
HISTORY_KEYS = (*KNOWLEDGE_KEYS, "certain_token_frac")


def _log_plots(tracker, done: int, metrics: dict, history) -> None:
    """The weight histogram and by-position plots of this step, and the knowledge / fork curves so far."""
    if "weight_hist_counts" in metrics:
        tracker.log_weight_plots(
            done,
            metrics["weight_hist_edges"],
            metrics["weight_hist_counts"],
            metrics["weight_by_position_edges"],
            metrics["weight_by_position"],
        )
    curves = history.curves(KNOWLEDGE_KEYS)
    if curves:
        tracker.log_curve_plot(
            done, "knowledge_weights", "Weight on teacher-certain tokens (knowledge) vs forks", curves,
            reference=history.curves(["certain_token_frac"]), ylabel="weight share / relative weight",
        )


def _check_teacher_coverage(cfg: TrainConfig, meta: dict) -> None:
    """Methods that weight by the teacher need its log-probs on every trace: say so before step 1."""
    if not cfg.loss.needs_teacher:
        return
    from dcd_megatron.data import DataConfigError

    fraction = float(meta.get("has_teacher_logprobs_fraction", 1.0))
    if fraction < 1.0:
        raise DataConfigError(
            f"loss.method={cfg.loss.method} weights tokens by the teacher's log-probs, but only "
            f"{fraction:.1%} of the kept training rows in {cfg.data.train_path} have `teacher_logprobs`; "
            "add them with `dcd-score`, drop the rows without them, or use loss.method=sft/student_only"
        )


def _checked_init_checkpoint(cfg: TrainConfig) -> Path:
    """The checkpoint directory `model.init_checkpoint` names (a run, its checkpoints/ or an iter dir),
    refused with the differing fields when its parameter shapes are not `cfg.model`'s."""
    from dcd_megatron.configs.overrides import ConfigError
    from dcd_megatron.model.inference import read_checkpoint_config

    path, theirs, _ = read_checkpoint_config(Path(cfg.model.init_checkpoint))
    differences = cfg.model.shape_differences(theirs.model)
    if differences:
        raise ConfigError(
            f"model.init_checkpoint={cfg.model.init_checkpoint} holds another architecture "
            f"({'; '.join(differences)}: this config vs the checkpoint); use the model section it was saved "
            f"with (the config in {path / 'meta.json'}; a dcd-convert output also has it as train.yaml for --config)"
        )
    return path


class StopSignal:
    """SIGTERM/SIGUSR1 (Slurm's warning before a time limit) asks for a checkpoint and a clean stop.

    All ranks agree on stopping through an all-reduce, so they save the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        self.device = device
        self.received = False
        self._previous = {}
        self._start_helpers_ignoring_signals()
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _start_helpers_ignoring_signals(self) -> None:
        """Start megatron's checkpoint-writer Manager process now, with the stop signals ignored.

        Slurm's `--signal` and `scancel --signal` reach every process of a job step; the Manager
        (spawned at the first save) would die of SIGUSR1 and fail the very checkpoint the signal
        asks for. Ignored signals stay ignored across exec, so the spawned process keeps them off.
        Not needed (and not started) where the writer gets an in-process queue instead.
        """
        from dcd_megatron.train.checkpoint import use_in_process_write_results

        if use_in_process_write_results():
            return
        try:
            from megatron.core.dist_checkpointing.strategies import filesystem_async
        except ImportError:
            return
        start = getattr(filesystem_async, "get_write_results_queue", None) or getattr(
            filesystem_async, "_get_write_results_queue", None
        )
        if start is None:
            return
        try:
            saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: the handlers are not ours to set either
            return
        try:
            start()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = True

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self.received = bool(flag.item())
        return self.received

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _save(ckpt, root, step, chunks, optimizer, scheduler, train_iter, cfg, config_text, padded_vocab):
    meta = {
        "consumed_samples": train_iter.consumed_samples,
        "config": config_text,
        "padded_vocab_size": padded_vocab,
    }
    path = ckpt.save_checkpoint(root, step, chunks, optimizer, scheduler, meta, keep=cfg.train.keep_checkpoints)
    if torch.distributed.get_rank() == 0:
        print(f"saved checkpoint {path}", flush=True)
    return path


def evaluate(run_step, chunks, valid_samples, cfg, layout, g, num_microbatches, step: int) -> dict:
    """Validation loss on held-out traces (forward only, fixed order), with the loss as at ``step``
    (the optimizer steps done: a tau schedule's current temperature)."""
    from dcd_megatron.data.batches import ValidationIterator
    from dcd_megatron.loss import reduce_reports

    valid_iter = ValidationIterator(
        valid_samples,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_rank=g["dp_rank"],
        dp_size=layout.dp,
    )
    n_micro = min(cfg.train.eval_iters * num_microbatches, max(valid_iter.num_microbatches, 1))
    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            reports = run_step(iter(valid_iter), step, n_micro, forward_only=True)
    finally:
        for chunk in chunks:
            chunk.train()
    metrics = reduce_reports(reports, dp_cp_group=g["dp_cp"]) if g["last_stage"] else None
    metrics = _share_metrics(metrics, g["last_stage_rank0"])
    keep = ("loss", "ce", "weighted_ce")
    return {f"val_{k}": v for k, v in metrics.items() if k in keep and isinstance(v, (int, float))}
