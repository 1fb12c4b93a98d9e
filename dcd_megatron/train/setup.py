"""Everything a training run needs, built once from a TrainConfig: the typed state the loop steps.

In order: the processes (device, process group, threads), the output directory's lock (rank 0:
one run per directory), the tokenizer and the parallel layout (every check that needs no other
process runs first), megatron's parallel groups,
the data (tokenised once by rank 0 into a memory-mapped cache), the model chunks wrapped in
megatron's DDP, the optimizer and scheduler, and the resume (or init) checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dcd_megatron.configs.train import TrainConfig
from dcd_megatron.loss.config import READS_STUDENT, DCDConfig
from dcd_megatron.runtime.distributed import ParallelGroups, ProcessInfo, RuntimeFacts
from dcd_megatron.runtime.layout import Layout


@dataclass(frozen=True)
class RunFacts:
    """What the run is, fixed once the processes and the layout are set up."""

    cfg: TrainConfig
    config_text: str  # travels with every checkpoint (meta.json), so a checkpoint is self-describing
    runtime: RuntimeFacts
    process: ProcessInfo
    layout: Layout
    groups: ParallelGroups
    padded_vocab: int
    num_microbatches: int
    loss: DCDConfig | None = None  # cfg.loss with loss.reference=auto resolved by the traces (set once they are read)

    @property
    def is_logger(self) -> bool:
        """Rank 0 writes metrics.jsonl, the console and MLflow."""
        return self.process.rank == 0

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"


@dataclass
class TrainState:
    """The run's facts and the objects the loop steps: model chunks, optimizer, scheduler, data."""

    run: RunFacts
    chunks: list  # this rank's model chunks (megatron DDP)
    optimizer: object  # megatron-core's MegatronOptimizer
    scheduler: object  # megatron-core's OptimizerParamScheduler
    train_iter: object  # dcd_megatron.data.MicroBatchIterator (its consumed_samples is the data's resume state)
    valid_samples: object | None  # held-out samples (None: no validation)
    num_train_samples: int
    run_schedule: Callable  # (data_iter, step, num_microbatches, forward_only) -> micro-batch reports
    start_step: int  # optimizer steps done before this process started
    checkpoint: Path | None  # the newest checkpoint of the run (the one resumed from, then each save)
    metrics: dict = field(default_factory=dict)  # the last step's metrics (and its validation)
    data_summary: dict = field(default_factory=dict)  # the tokenizer and training data, saved with each checkpoint
    resume_changes: list[str] = field(default_factory=list)  # what this resume changed (train.resume_changes), logged
    lock: object = None  # rank 0: the output directory's OutputLock (runtime/output_lock.py); train() releases it


def setup(cfg: TrainConfig, config_text: str) -> TrainState:
    """The processes, data, model, optimizer and resume point for `cfg` (collective over all ranks)."""
    from dcd_megatron.runtime.output_lock import lock_output_dir

    cfg.validate()  # a recipe or caller may have changed sections in place
    facts, info = _start_processes(cfg)
    # One run per directory: rank 0 locks it before anything is written there; all ranks learn the verdict.
    lock = lock_output_dir(cfg.train.output_dir, setting="train.output_dir", rank=info.rank, world_size=info.world_size)
    try:
        state = _set_up(cfg, config_text, facts, info)
    except BaseException:
        lock.release()
        raise
    state.lock = lock
    return state


def _set_up(cfg: TrainConfig, config_text: str, facts: RuntimeFacts, info: ProcessInfo) -> TrainState:
    """Everything after the processes and the output directory's lock (see `setup`)."""
    from dcd_megatron.data import load_tokenizer
    from dcd_megatron.runtime import distributed as rt

    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type)
    vocab_size = _checked_vocab_size(cfg, tokenizer)
    layout = _checked_layout(cfg, info.world_size, facts)
    rt.init_model_parallel(layout, cfg.train.seed)
    run = RunFacts(
        cfg=cfg, config_text=config_text, runtime=facts, process=info, layout=layout, groups=rt.parallel_groups(),
        padded_vocab=cfg.model.padded_vocab_size(vocab_size, layout.tp),
        num_microbatches=cfg.train.global_batch_size // (cfg.train.micro_batch_size * layout.dp),
    )
    _check_disks(run)  # before anything is tokenised or trained: a read-only or full disk is one line now
    data = _load_data(run, tokenizer)
    run = dataclasses.replace(run, loss=_checked_loss(run, data.train_meta))
    chunks, optimizer, scheduler = _build_model(run)
    summary = _data_summary(data.train_meta, tokenizer)
    scored_by = data.train_meta.get("counts", {}).get(cfg.data.field_student_ref_checkpoint, {})
    start_step, consumed, resumed_from, changes = _restore(run, chunks, optimizer, scheduler, summary, scored_by)
    return TrainState(
        run=run, chunks=chunks, optimizer=optimizer, scheduler=scheduler,
        train_iter=_train_iterator(run, data.train, consumed), valid_samples=data.valid,
        num_train_samples=len(data.train), run_schedule=_schedule(run, chunks),
        start_step=start_step, checkpoint=resumed_from, data_summary=summary, resume_changes=changes,
    )


def _start_processes(cfg: TrainConfig) -> tuple[RuntimeFacts, ProcessInfo]:
    """Device and Transformer Engine facts, the FP8 check, the process group and the thread count."""
    from dcd_megatron.model.fp8 import check_fp8, current_capability
    from dcd_megatron.runtime import distributed as rt

    facts = rt.runtime_facts(cfg.runtime.device)
    # Everything that can be checked before processes talk to each other is checked here.
    check_fp8(cfg.model.fp8, cfg.model.fp8_recipe, has_te=facts.has_te, capability=current_capability())
    info = rt.init_process_group(facts.device, cfg.runtime.timeout_minutes)
    rt.set_threads(cfg.runtime.num_threads, info.world_size)
    return facts, info


def _checked_vocab_size(cfg: TrainConfig, tokenizer) -> int:
    from dcd_megatron.data import TokenizerError

    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise TokenizerError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} ids "
            f"({cfg.data.tokenizer}): larger ids would index past the embedding; unset model.vocab_size or raise it"
        )
    return vocab_size


def _checked_layout(cfg: TrainConfig, world_size: int, facts: RuntimeFacts) -> Layout:
    from dcd_megatron.runtime.layout import LayoutError, validate_layout

    layout = validate_layout(
        cfg.parallel,
        world_size=world_size,
        num_layers=cfg.model.num_layers,
        num_attention_heads=cfg.model.num_attention_heads,
        num_query_groups=cfg.model.query_groups,
        ffn_hidden_size=cfg.model.ffn_size,
        seq_length=cfg.data.seq_length,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        has_te=facts.has_te,
    )
    if layout.cp > 1 and cfg.data.pack:
        raise LayoutError(
            "data.pack=true with parallel.cp > 1 is not supported yet (packed documents would need "
            "per-document context-parallel splits); set data.pack=false or parallel.cp=1"
        )
    return layout


def checkpoint_bytes(cfg: TrainConfig, padded_vocab: int) -> int:
    """About what one checkpoint takes on disk: the weights plus Adam's two fp32 moments (and fp32
    main weights under bf16/fp16), 12-16 bytes a parameter, and 10% for the format's own records."""
    weight = 4 if cfg.model.params_dtype == "fp32" else 2
    per_param = weight + 8 + (0 if weight == 4 else 4)
    return cfg.model.num_parameters(padded_vocab) * per_param * 11 // 10


def _check_disks(run: RunFacts) -> None:
    """Rank 0 probes every folder the run writes (writable, room for one checkpoint); every rank stops on a problem."""
    from dcd_megatron.runtime.disk import DiskError, Target, check_writable
    from dcd_megatron.runtime.distributed import share_object
    from dcd_megatron.tracking.config import sqlite_path

    cfg, verdict = run.cfg, None
    if run.is_logger:
        need = checkpoint_bytes(cfg, run.padded_vocab)
        targets = [
            Target(run.output_dir, "train.output_dir"),
            Target(run.checkpoint_root, "train.output_dir", need,
                   f"one checkpoint ({cfg.model.num_parameters(run.padded_vocab):,} parameters: weights + optimizer state)"),
            Target(Path(cfg.data.cache_dir) if cfg.data.cache_dir else run.output_dir / "cache", "data.cache_dir"),
        ]
        store = sqlite_path(cfg.tracking.resolved_uri()) if cfg.tracking.enabled else None
        if store is not None:
            targets.append(Target(store.parent, "tracking.tracking_uri (MLflow's local store)"))
        try:
            check_writable(targets)
        except DiskError as exc:
            verdict = str(exc)
    if run.process.world_size > 1:
        verdict = share_object(verdict, 0)
    if verdict:
        raise DiskError(verdict)


def _load_data(run: RunFacts, tokenizer):
    """Tokenise once (rank 0), then every rank memory-maps the cache."""
    from dcd_megatron.data import build_caches, load_trace_data

    data_cfg = run.cfg.data
    if not data_cfg.cache_dir:
        data_cfg = dataclasses.replace(data_cfg, cache_dir=str(run.output_dir / "cache"))
    if run.is_logger:
        build_caches(data_cfg, tokenizer)
    torch.distributed.barrier()
    return load_trace_data(data_cfg, tokenizer, build=False)


def _checked_loss(run: RunFacts, meta: dict) -> DCDConfig:
    """The loss config the run trains with (``loss.reference=auto`` resolved by the traces, said in one
    line), after checking that the traces carry the log-probs its weights read: before step 1."""
    cfg = run.cfg
    reference = float(meta.get("has_student_ref_logprobs_fraction", 0.0))
    loss = cfg.loss.resolved(traces_have_reference=reference > 0)
    _check_teacher_coverage(cfg, loss, meta)
    if cfg.loss.reference == "auto" and loss.method in READS_STUDENT and run.is_logger:
        print("loss.reference=auto: " + (
            f"the weights read the initial student's {cfg.data.field_student_ref_logprobs} (the traces carry them)"
            if loss.reference == "initial" else
            f"the traces carry no {cfg.data.field_student_ref_logprobs}, so the weights read the live student, "
            "without the trajectory discount; `dcd-score --reference --teacher INIT_CHECKPOINT` adds them "
            "(docs/loss.md, \"A frozen reference student\")"), flush=True)
    return loss


def _check_teacher_coverage(cfg: TrainConfig, loss: DCDConfig, meta: dict) -> None:
    """Methods that weight by the teacher (or by the initial student) need its log-probs on every
    trace: say so before step 1."""
    from dcd_megatron.data import DataConfigError

    reference = float(meta.get("has_student_ref_logprobs_fraction", 0.0))
    if loss.needs_reference and not cfg.model.init_checkpoint:
        raise DataConfigError(
            f"the traces carry {cfg.data.field_student_ref_logprobs} (loss.reference={cfg.loss.reference}) but "
            "model.init_checkpoint is not set: set it to the checkpoint that scored them (`dcd-score --reference`), "
            "or set loss.reference=live"
        )
    if loss.needs_reference and reference < 1.0:
        raise DataConfigError(
            f"loss.reference=initial weights tokens by the initial student's log-probs, but only {reference:.1%} of "
            f"the kept training rows in {cfg.data.train_path} have `{cfg.data.field_student_ref_logprobs}`; score them "
            "once with the checkpoint the run starts from (`dcd-score --reference --teacher INIT_CHECKPOINT ...`, "
            "docs/scoring.md), or set loss.reference=live"
        )
    if not cfg.loss.needs_teacher:
        return

    fraction = float(meta.get("has_teacher_logprobs_fraction", 1.0))
    if fraction < 1.0:
        raise DataConfigError(
            f"loss.method={cfg.loss.method} weights tokens by the teacher's log-probs, but only "
            f"{fraction:.1%} of the kept training rows in {cfg.data.train_path} have `teacher_logprobs`; "
            "add them with `dcd-score`, drop the rows without them, or use loss.method=sft/student_only"
        )


def _build_model(run: RunFacts):
    """This rank's pipeline stage of the student in megatron's DDP, its optimizer and scheduler."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from dcd_megatron.model.builder import build_gpt_model, return_hidden_states, transformer_config
    from dcd_megatron.train.optim import build_optimizer, build_scheduler

    cfg = run.cfg
    tconfig = transformer_config(
        cfg.model, run.layout, sequence_parallel=cfg.parallel.sequence_parallel, facts=run.runtime
    )
    model = build_gpt_model(
        cfg.model,
        tconfig,
        padded_vocab_size=run.padded_vocab,
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=run.groups.first_stage,
        post_process=run.groups.last_stage,
        use_te=run.runtime.has_te,
    ).to(run.runtime.device)
    if cfg.loss.chunked:  # the loss makes the logits itself, a chunk of tokens at a time
        return_hidden_states(model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.optim.distributed_optimizer
    )
    chunks = [DistributedDataParallel(tconfig, ddp_config, model)]
    # megatron's schedule calls this after the last backward: it finishes the DP gradient
    # all-reduce and divides by the global token count (calculate_per_token_loss=True).
    tconfig.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer(cfg.optim, chunks, params_dtype=cfg.model.params_dtype, facts=run.runtime)
    return chunks, optimizer, build_scheduler(cfg.optim, optimizer, cfg.train.steps)


def _restore(run: RunFacts, chunks, optimizer, scheduler, summary: dict,
             scored_by: dict) -> tuple[int, int, Path | None, list[str]]:
    """(steps done, samples consumed, the checkpoint resumed from, what the resume changes):
    `train.resume`, else `model.init_checkpoint` (``scored_by``: the traces' reference-scoring
    checkpoints and their row counts, which must be it under loss.reference=initial)."""
    from dcd_megatron import checkpoint as ckpt

    cfg = run.cfg
    resume_from = _verified_resume(run)
    if resume_from is not None:
        changes = _checked_changes(run, resume_from, scheduler, summary)
        meta = ckpt.load_checkpoint(resume_from, chunks, optimizer, scheduler)
        if "optim" in changes.approved_groups:
            _apply_optim_settings(cfg.optim, optimizer)
        start_step, consumed = int(meta["step"]), int(meta["consumed_samples"])
        if run.is_logger:
            print(f"resumed from {resume_from} at step {start_step}", flush=True)
            for line in changes.lines:
                print(f"resume changes {line}", flush=True)
        if start_step >= cfg.train.steps and run.is_logger:
            print(f"{resume_from} is already at step {start_step} of train.steps={cfg.train.steps}: nothing to "
                  "train (raise train.steps with train.resume_changes=[schedule], or use a new train.output_dir)",
                  flush=True)
        return start_step, consumed, resume_from, changes.lines
    if cfg.model.init_checkpoint:
        init_from = _checked_init_checkpoint(cfg)
        _check_reference_source(cfg, run.loss or cfg.loss, init_from, scored_by)
        ckpt.load_checkpoint(init_from, chunks, None, None, load_optimizer=False)
        ckpt.leases.release(init_from)  # held since _checked_init_checkpoint found it
        if run.is_logger:
            print(f"initialised the student from {init_from}", flush=True)
    return 0, 0, None, []


def _verified_resume(run: RunFacts) -> Path | None:
    """The checkpoint `train.resume` names, verified by all ranks (each hashes a share of its files);
    damaged newer ones are named and moved aside (`iter_N.damaged-K`), foreign entries skipped."""
    from dcd_megatron import checkpoint as ckpt
    from dcd_megatron.runtime.distributed import all_gather_lists

    root = run.checkpoint_root
    if run.cfg.train.resume == "never":
        _refuse_a_used_directory(run)
    if run.is_logger:
        ckpt.warn_foreign(root, say=lambda line: print(f"warning: {line}", flush=True))
    part = (run.process.rank, run.process.world_size)
    selection = ckpt.resolve_resume(run.cfg.train.resume, root, part=part, gather=all_gather_lists)
    if run.is_logger:
        for line in selection.fallback_lines():
            print(f"warning: {line}", flush=True)
        for damaged, _ in selection.rejected:
            ckpt.move_aside(damaged, "damaged")
    torch.distributed.barrier()
    return selection.chosen


def _refuse_a_used_directory(run: RunFacts) -> None:
    """`train.resume=never` starts a new run: never over another run's checkpoints and metrics.jsonl."""
    from dcd_megatron import checkpoint as ckpt
    from dcd_megatron.runtime.output_lock import OutputDirError

    found = ckpt.candidates(run.checkpoint_root)
    held = ([f"checkpoints up to {found[0].name}"] if found else []) + (
        ["metrics.jsonl"] if (run.output_dir / "metrics.jsonl").is_file() else [])
    if held:
        raise OutputDirError(
            f"train.output_dir={run.output_dir} already holds a run ({', '.join(held)}); train.resume=never would "
            "write a new run over its files: use a new train.output_dir, or train.resume=auto to go on with it"
        )


@dataclass(frozen=True)
class _Changes:
    approved_groups: tuple[str, ...]
    lines: list[str]


def _checked_changes(run: RunFacts, checkpoint: Path, scheduler, summary: dict) -> _Changes:
    """Refuse what the checkpoint's weights cannot survive or the user did not approve (one line)."""
    import yaml

    from dcd_megatron import checkpoint as ckpt
    from dcd_megatron.configs import from_dict
    from dcd_megatron.train.resume import change_lines, checked_resume

    meta = ckpt.read_meta(checkpoint)
    theirs = from_dict(TrainConfig, yaml.safe_load(meta["config"]))
    approved = list(run.cfg.train.resume_changes)
    check = checked_resume(run.cfg, theirs, str(checkpoint), summary, meta.get("data"))
    groups = tuple(check.approved(approved))
    if {"optim", "schedule"} & set(groups):
        scheduler.override_opt_param_scheduler = True  # the new learning-rate schedule applies from here
    return _Changes(approved_groups=groups, lines=change_lines(check, approved))


def _apply_optim_settings(optim, optimizer) -> None:
    """An approved optim change: the loaded optimizer state keeps its moments, takes the new betas / eps."""
    for group in optimizer.param_groups:
        group["betas"] = (optim.adam_beta1, optim.adam_beta2)
        group["eps"] = optim.adam_eps


def _data_summary(train_meta: dict, tokenizer) -> dict:
    """What a checkpoint records of its training data (compared on resume): the tokenizer and the content."""
    return {
        "tokenizer": getattr(tokenizer, "fingerprint", None),
        "docs": train_meta.get("kept"),
        "tokens": train_meta.get("tokens"),
        "response_tokens": train_meta.get("response_tokens"),
        "cache_key": train_meta.get("key"),
    }


def _check_reference_source(cfg: TrainConfig, loss: DCDConfig, init_from: Path, scored_by: dict) -> None:
    """Under loss.reference=initial every trace's reference log-probs come from this init checkpoint."""
    if not loss.needs_reference:
        return
    from dcd_megatron.checkpoint import fingerprint
    from dcd_megatron.configs.overrides import ConfigError

    mine = fingerprint(init_from)
    others = {source: n for source, n in scored_by.items() if source != mine}
    if others or not scored_by:
        found = ", ".join(f"{s} ({n} rows)" for s, n in sorted(others.items())) or "no checkpoint recorded"
        raise ConfigError(
            f"loss.reference=initial: the traces' {cfg.data.field_student_ref_logprobs} were scored by {found}, "
            f"but the run starts from {init_from} ({mine}); rescore them with it (`dcd-score --reference "
            f"--teacher {init_from} ...`) or set model.init_checkpoint to the checkpoint that scored them"
        )


def _checked_init_checkpoint(cfg: TrainConfig) -> Path:
    """The checkpoint directory `model.init_checkpoint` names (a run, its checkpoints/ or an iter dir),
    refused with the differing fields when its parameter shapes are not `cfg.model`'s."""
    from dcd_megatron.checkpoint import read_checkpoint_config
    from dcd_megatron.configs.overrides import ConfigError

    path, theirs, _ = read_checkpoint_config(Path(cfg.model.init_checkpoint), hold=True)  # released once loaded
    differences = cfg.model.shape_differences(theirs.model)
    if differences:
        raise ConfigError(
            f"model.init_checkpoint={cfg.model.init_checkpoint} holds another architecture "
            f"({'; '.join(differences)}: this config vs the checkpoint); use the model section it was saved "
            f"with (the config in {path / 'meta.json'}; a dcd-convert output also has it as train.yaml for --config)"
        )
    return path


def _train_iterator(run: RunFacts, samples, consumed: int):
    from dcd_megatron.data import MicroBatchIterator

    cfg = run.cfg
    return MicroBatchIterator(
        samples,
        micro_batch_size=cfg.train.micro_batch_size,
        num_microbatches=run.num_microbatches,
        dp_rank=run.groups.dp_rank,
        dp_size=run.layout.dp,
        seed=cfg.train.seed,
        consumed_samples=consumed,
        shuffle=cfg.data.shuffle,
    )


def _schedule(run: RunFacts, chunks) -> Callable:
    """`run_schedule(data_iter, step, n_micro, forward_only)`: megatron's pipeline schedule over
    `n_micro` micro-batches with the DCD loss as at optimizer step `step`; returns its reports."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dcd_megatron.data import split_for_context_parallel
    from dcd_megatron.loss import make_loss_func
    from dcd_megatron.train.step import make_forward_step

    cfg, layout, groups = run.cfg, run.layout, run.groups
    cp_split = None
    if layout.cp > 1:
        cp_rank, cp_size = groups.cp_rank, layout.cp
        cp_split = lambda batch: split_for_context_parallel(batch, cp_rank, cp_size)  # noqa: E731
    forward_backward = get_forward_backward_func()

    def run_schedule(data_iter, step: int, n_micro: int, forward_only: bool):
        loss_func = make_loss_func(run.loss or cfg.loss, tp_group=groups.tp, cp_group=groups.cp if layout.cp > 1 else None, step=step)
        forward_step = make_forward_step(
            loss_func, packed=cfg.data.pack, use_te=run.runtime.has_te, device=run.runtime.device,
            cp_split=cp_split, hidden_states=cfg.loss.chunked,
        )
        return forward_backward(
            forward_step_func=forward_step,
            data_iterator=data_iter,
            model=chunks,
            num_microbatches=n_micro,
            seq_length=cfg.data.seq_length // layout.cp,
            micro_batch_size=cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    return run_schedule
