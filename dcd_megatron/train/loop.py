"""The training job: set up (`setup.py`), then step, log, validate and checkpoint.

Read top to bottom, one batch goes: trace files -> token cache -> packed micro-batches ->
GPTModel (one pipeline stage per rank) -> DCD loss -> megatron's schedule -> global weight
normalisation -> optimizer -> metrics on rank 0 -> MLflow and the console (`metrics.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dcd_megatron.configs import to_dict
from dcd_megatron.configs.train import TrainConfig
from dcd_megatron.errors import UserError
from dcd_megatron.tracking.intervals import due
from dcd_megatron.train.metrics import VALIDATION_KEYS, MetricsSink, scalars
from dcd_megatron.train.setup import TrainState, setup
from dcd_megatron.train.signals import StopSignal


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


def train(cfg: TrainConfig, config_text: str | None = None) -> TrainResult:
    """Run one training job described by `cfg`; returns the final metrics."""
    import yaml

    state = setup(cfg, config_text or yaml.safe_dump(to_dict(cfg), sort_keys=False))
    try:
        return _train_and_record(state)
    finally:  # whatever happens after setup (the sink's start included), the directory is free again
        state.lock.release()  # rank 0's lock on the output directory (a no-op on the other ranks)


def _train_and_record(state: TrainState) -> TrainResult:
    """The steps with every sink open, the run's end recorded whatever happens."""
    sink = MetricsSink(state.run, state.start_step)
    sink.say(_layout_line(state, sink))
    if state.resume_changes:  # approved by train.resume_changes: on the record beside the run
        name = f"config/resume-changes-step-{state.start_step}.txt"
        sink.tracker.log_text("\n".join(state.resume_changes) + "\n", name)
    stop_signal = StopSignal(state.run.runtime.device)
    final_step, status, stop_reason, failure = state.start_step, "FAILED", None, None
    try:
        final_step, stop_reason = _run(state, sink, stop_signal)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except UserError as exc:  # e.g. a save on a full disk: its line goes into final_metrics.json too
        failure = str(exc)
        raise
    finally:  # stopped early: STOPPED
        sink.finish(status, final_step, state.metrics, stop_reason=stop_reason, failure=failure)
        stop_signal.restore()
    sink.summary()
    return TrainResult(
        step=final_step,
        metrics=state.metrics,
        output_dir=state.run.output_dir,
        checkpoint=state.checkpoint,
        run_description=sink.describe(),
        history=sink.history.curves(),
    )


def _layout_line(state: TrainState, sink: MetricsSink) -> str:
    run = state.run
    layout, cfg = run.layout, run.cfg
    return (f"layout tp={layout.tp} pp={layout.pp} cp={layout.cp} dp={layout.dp}, "
            f"{run.num_microbatches} micro-batches of {cfg.train.micro_batch_size} x {cfg.data.seq_length} tokens; "
            f"{state.num_train_samples} training samples; {sink.describe()}")


def _run(state: TrainState, sink: MetricsSink, stop_signal: StopSignal) -> tuple[int, str | None]:
    """Steps from where the run stands to `train.steps` (or a stop); returns the steps done and,
    when it stopped early, why (None when it ran to the end)."""
    cfg = state.run.cfg
    steps = cfg.train.steps
    for step in range(state.start_step, steps):
        done = step + 1
        state.metrics = train_step(state, step)
        sink.log_step(done, state.metrics)
        if state.valid_samples is not None and due(done, cfg.train.eval_interval, last=steps):
            val = evaluate(state, step=done)
            sink.log_validation(done, val)
            state.metrics.update(val)
        stop = (cfg.train.stop_after and done >= cfg.train.stop_after) or stop_signal.requested()
        if done < steps and (stop or due(done, cfg.train.save_interval)):
            save(state, done)
        if stop and done < steps:
            why = "a stop signal" if stop_signal.received else f"train.stop_after={cfg.train.stop_after}"
            sink.say(f"stopping after step {done} ({why}); resume with train.resume=auto")
            return done, ("stop signal (SIGTERM or SIGUSR1)" if stop_signal.received else why)
    if state.start_step < steps or state.checkpoint is None:
        save(state, steps)
    return steps, None


def train_step(state: TrainState, step: int) -> dict:
    """One optimizer step (`step` steps done before it); its metrics, on every rank."""
    from dcd_megatron.loss import rescale_grads_for_global_weight_mean

    run, groups = state.run, state.run.groups
    t0 = time.perf_counter()
    for chunk in state.chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    reports = state.run_schedule(state.train_iter, step, run.num_microbatches, forward_only=False)
    rescale_grads_for_global_weight_mean(
        state.chunks, reports if groups.last_stage else [], pp_group=groups.pp, dp_cp_group=groups.dp_cp
    )
    ok, grad_norm, _ = state.optimizer.step()
    state.scheduler.step(increment=1)
    metrics = _shared_metrics(state, reports)
    elapsed = time.perf_counter() - t0
    metrics.update(
        lr=state.optimizer.param_groups[0]["lr"],
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        update_skipped=float(not ok),
        tokens_per_s=run.cfg.train.global_batch_size * run.cfg.data.seq_length / elapsed,
        step_time_s=elapsed,
    )
    return metrics


def _shared_metrics(state: TrainState, reports) -> dict:
    """The step's reduced loss reports (computed on the last stage) on every rank."""
    from dcd_megatron.loss import reduce_reports
    from dcd_megatron.runtime.distributed import share_object

    groups = state.run.groups
    metrics = reduce_reports(reports, dp_cp_group=groups.dp_cp) if groups.last_stage else None
    return share_object(metrics, groups.metrics_rank) or {}


def evaluate(state: TrainState, step: int) -> dict:
    """Validation loss on held-out traces (forward only, fixed order), with the loss as at ``step``
    (the optimizer steps done: a tau schedule's current temperature)."""
    from dcd_megatron.data.batches import ValidationIterator

    run = state.run
    valid_iter = ValidationIterator(
        state.valid_samples,
        micro_batch_size=run.cfg.train.micro_batch_size,
        dp_rank=run.groups.dp_rank,
        dp_size=run.layout.dp,
    )
    n_micro = min(run.cfg.train.eval_iters * run.num_microbatches, max(valid_iter.num_microbatches, 1))
    for chunk in state.chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            reports = state.run_schedule(iter(valid_iter), step, n_micro, forward_only=True)
    finally:
        for chunk in state.chunks:
            chunk.train()
    metrics = scalars(_shared_metrics(state, reports))
    return {f"val_{k}": v for k, v in metrics.items() if k in VALIDATION_KEYS}


def save(state: TrainState, step: int) -> Path:
    """A checkpoint of the run at `step` (collective); it becomes `state.checkpoint`."""
    from dcd_megatron.checkpoint import save_checkpoint
    from dcd_megatron.runtime.distributed import share_object
    from dcd_megatron.runtime.output_lock import OutputDirBusyError

    run = state.run
    if not share_object(state.lock is None or state.lock.held(), src=0):
        raise OutputDirBusyError(
            f"the lock on train.output_dir={run.output_dir} was taken over by another run (see its .dcd.lock) while "
            f"this one was stalled; stopping at step {step} without writing a checkpoint over that run's files"
        )
    meta = {
        "consumed_samples": state.train_iter.consumed_samples,
        "config": run.config_text,
        "padded_vocab_size": run.padded_vocab,
        "data": state.data_summary,  # the tokenizer and the training data's content: a resume compares them
    }
    state.checkpoint = save_checkpoint(
        run.checkpoint_root, step, state.chunks, state.optimizer, state.scheduler, meta,
        keep=run.cfg.train.keep_checkpoints,
    )
    if run.is_logger:
        print(f"saved checkpoint {state.checkpoint}", flush=True)
    return state.checkpoint
