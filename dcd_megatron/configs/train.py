"""The whole training job as one typed config: model, layout, data, loss, optimiser, loop, logging."""

from dataclasses import dataclass, field
from typing import Literal

from dcd_megatron.data.config import DataConfig
from dcd_megatron.loss.config import DCDConfig
from dcd_megatron.model.config import ModelConfig
from dcd_megatron.runtime.layout import ParallelConfig
from dcd_megatron.tracking.config import TrackingConfig
from dcd_megatron.errors import ConfigError


@dataclass
class OptimConfig:
    """Adam with decoupled weight decay, linear warm-up then cosine (or linear/constant) decay."""

    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the last step
    weight_decay: float = 0.01  # decoupled (AdamW) weight decay
    adam_beta1: float = 0.9  # Adam first-moment decay
    adam_beta2: float = 0.95  # Adam second-moment decay
    adam_eps: float = 1e-8  # Adam epsilon
    clip_grad: float = 1.0  # global gradient-norm clip (0 = off)
    warmup_steps: int = 10  # linear warm-up from 0 to lr
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"  # decay from lr to min_lr after warm-up
    distributed_optimizer: bool = False  # shard optimizer state over DP (GPU only)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks run at construction; call again after changing fields in place."""
        if not 0 < self.lr < float("inf"):  # also NaN
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"optim.adam_eps must be > 0, got {self.adam_eps}")
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad must be >= 0 (0 = no clipping), got {self.clip_grad}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


# What `train.resume_changes` may name (dcd_megatron.train.resume says which fields are in each).
RESUME_CHANGE_GROUPS = ("data", "loss", "optim", "schedule", "model", "all")


@dataclass
class LoopConfig:
    """Steps, batch sizes, intervals and where the run lives."""

    steps: int = 100  # optimizer steps
    global_batch_size: int = 8  # samples per step over all data-parallel ranks
    micro_batch_size: int = 2  # samples per forward pass (the rest is gradient accumulation)
    seed: int = 1234  # initialisation and data order
    log_interval: int = 10  # steps between console lines (MLflow gets every step)
    eval_interval: int = 50  # 0 = no periodic validation
    eval_iters: int = 2  # validation global batches per evaluation
    save_interval: int = 50  # 0 = only at the end
    keep_checkpoints: int = 2  # newest complete checkpoints kept (0 = keep all)
    stop_after: int = 0  # stop with a checkpoint once this many steps are done (0 = run to `steps`)
    output_dir: str = "runs/dcd"  # checkpoints/, metrics.jsonl, final_metrics.json, cache/
    resume: str = "auto"  # auto (the newest checkpoint in output_dir that verifies, if any), never, or a path
    resume_changes: list[str] = field(default_factory=list)  # what a resume may change (data, loss, optim, schedule, model, all); see docs/checkpoints.md

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks run at construction; call again after changing fields in place."""
        for name in ("steps", "global_batch_size", "micro_batch_size", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_interval", "eval_iters", "save_interval", "keep_checkpoints", "stop_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.micro_batch_size}"
            )
        if not self.output_dir:
            raise ConfigError("train.output_dir must be set")
        unknown = [g for g in self.resume_changes if g not in RESUME_CHANGE_GROUPS]
        if unknown:
            raise ConfigError(f"train.resume_changes: {unknown} are not among {list(RESUME_CHANGE_GROUPS)}")


@dataclass
class RuntimeConfig:
    """Where and how the processes run."""

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = CUDA when visible
    timeout_minutes: int = 30  # collective timeout
    num_threads: int = 0  # torch intra-op threads per rank on CPU (0 = cores / local ranks)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks run at construction; call again after changing fields in place."""
        if self.timeout_minutes < 1:
            raise ConfigError("runtime.timeout_minutes must be >= 1")
        if self.num_threads < 0:
            raise ConfigError("runtime.num_threads must be >= 0")


@dataclass
class TrainConfig:
    """Everything one `dcd-train` run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: DCDConfig = field(default_factory=DCDConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every section's checks, then those across sections: at construction, after overrides
        (`configs.apply_overrides` builds a new config) and when a job starts, so a section a
        recipe changed in place is checked too."""
        for section in (self.model, self.parallel, self.data, self.loss, self.optim, self.train, self.tracking,
                        self.runtime):
            section.validate()
        if self.model.max_position_embeddings < self.data.seq_length:
            raise ConfigError(
                f"data.seq_length={self.data.seq_length} exceeds "
                f"model.max_position_embeddings={self.model.max_position_embeddings}"
            )
        if self.loss.needs_reference and not self.model.init_checkpoint:
            raise ConfigError(
                "loss.reference=initial compares the teacher with the checkpoint the run starts from, but "
                "model.init_checkpoint is not set: set it to the checkpoint that scored the traces' "
                f"{self.data.field_student_ref_logprobs} (`dcd-score --reference`), or use loss.reference=live"
            )
        readers = [name for name, reads in (("loss.term=topk_kl", self.loss.term == "topk_kl"),
                                            ("loss.gate=entropy", self.loss.entropy_gate)) if reads]
        if readers and self.data.topk < 1:
            raise ConfigError(
                f"{' and '.join(readers)} reads the teacher's top-k, but data.topk=0 keeps none: set data.topk=K "
                "(traces scored with `dcd-score --top-k K`), or use loss.term=nll / loss.gate=token"
            )


# Short override keys accepted on the command line (`tp=2 pp=2`).
ALIASES = {
    "tp": "parallel.tp",
    "pp": "parallel.pp",
    "cp": "parallel.cp",
    "steps": "train.steps",
    "lr": "optim.lr",
    "method": "loss.method",
    "output_dir": "train.output_dir",
    "seed": "train.seed",
}
