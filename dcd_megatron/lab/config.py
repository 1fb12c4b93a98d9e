"""The drift lab's settings as typed, validated dataclasses: models, stages, arms, evaluation.

`LabConfig()` is the published lab (sized to run in under 25 minutes on 2 CPU cores);
`tiny_lab_config()` is the end-to-end test's miniature. Dotted overrides
(`distill.steps=100`) go through `configs.apply_overrides`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dcd_megatron.lab.arms import ARMS, DEFAULT_ARMS
from dcd_megatron.lab.task import STYLES


class LabConfigError(ValueError):
    """A lab setting is invalid; the message names the field and the fix."""


def _fail(name: str, problem: str, fix: str) -> None:
    raise LabConfigError(f"lab.{name}: {problem}; {fix}")


def _check_range(name: str, pair: list[int], low: int = 2) -> None:
    if len(pair) != 2 or pair[0] < low or pair[1] < pair[0]:
        _fail(name, f"{pair!r} is not a [min, max] digit-count range with {low} <= min <= max",
              f"use e.g. {name}=[2,8]")


@dataclass
class NetConfig:
    """One lab model's architecture (Llama-style GPT with RoPE, as the trainer builds it)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 192

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(self, name) < 1:
                _fail(f"*.net.{name}", f"must be >= 1, got {getattr(self, name)}", "use a positive size")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_query_groups:
            _fail("*.net", f"hidden_size {self.hidden_size}, heads {self.num_attention_heads} and groups "
                  f"{self.num_query_groups} do not divide", "pick heads dividing hidden_size and groups dividing heads")


@dataclass
class StageConfig:
    """One training stage: optimizer steps, batch, learning rate (cosine decay after warm-up)."""

    steps: int = 300
    global_batch_size: int = 32
    micro_batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10

    def __post_init__(self):
        if self.steps < 1:
            _fail("*.steps", f"must be >= 1, got {self.steps}", "give the number of optimizer steps")
        if self.micro_batch_size < 1 or self.global_batch_size % self.micro_batch_size:
            _fail("*.global_batch_size", f"{self.global_batch_size} is not a multiple of micro_batch_size "
                  f"{self.micro_batch_size}", "make it one")
        if not 0 < self.min_lr <= self.lr:
            _fail("*.lr", f"need 0 < min_lr ({self.min_lr}) <= lr ({self.lr})", "fix the two rates")


@dataclass
class TeacherConfig:
    """The teacher: trained with SFT on exact traces of every style, then sampled at temperature."""

    net: NetConfig = field(default_factory=lambda: NetConfig(3, 96, 4, 2, 256))
    train: StageConfig = field(default_factory=lambda: StageConfig(
        steps=900, global_batch_size=16, micro_batch_size=16, lr=3e-3, min_lr=1e-4, warmup_steps=30))
    rows: int = 16000
    k: list[int] = field(default_factory=lambda: [2, 10])
    styles: dict[str, float] = field(default_factory=lambda: {"verbose": 0.4, "skip2": 0.3, "skip3": 0.3})
    # reuse a teacher trained by an earlier lab run with the same data settings (for iterating on
    # arms); the report then says the run was not fresh. None: train one.
    checkpoint: str | None = None


@dataclass
class TracesConfig:
    """The offline distillation data: teacher samples at `temperature`, kept when correct."""

    k: list[int] = field(default_factory=lambda: [2, 10])
    count: int = 4000
    temperature: float = 1.0


@dataclass
class StrongConfig:
    """The second condition: a scripted strong teacher (lab/scripted.py) and a long distillation run.

    The teacher writes style s with probability `styles[s]` and every determined token right with
    probability 1 - eps; the run makes several passes over fewer traces, so that a leaky weight has
    the time to flip the student to the teacher's style.
    """

    enabled: bool = True
    styles: dict[str, float] = field(default_factory=lambda: {"verbose": 0.4, "skip2": 0.3, "skip3": 0.3})
    result_eps: dict[str, float] = field(default_factory=lambda: {"verbose": 0.01, "skip2": 0.03, "skip3": 0.05})
    copy_eps: float = 0.005
    k: list[int] = field(default_factory=lambda: [2, 10])
    count: int = 1000  # traces kept
    distill: StageConfig = field(default_factory=lambda: StageConfig(
        steps=250, global_batch_size=8, micro_batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=10))


@dataclass
class StudentConfig:
    """The student: its prior is SFT on a narrow distribution (one style, short problems)."""

    net: NetConfig = field(default_factory=lambda: NetConfig(2, 96, 4, 2, 256))
    prior_train: StageConfig = field(default_factory=lambda: StageConfig(
        steps=500, global_batch_size=16, micro_batch_size=16, lr=3e-3, min_lr=1e-4, warmup_steps=20))
    prior_rows: int = 6000
    prior_k: list[int] = field(default_factory=lambda: [2, 6])
    prior_style: str = "verbose"
    prior_per_seed: bool = True  # one prior per seed (seeds differ in init too), else one shared


@dataclass
class EvalConfig:
    """Held-out problems (never seen in any training set) and the measurements on them."""

    known_k: list[int] = field(default_factory=lambda: [4, 6])
    new_k: list[int] = field(default_factory=lambda: [8, 10])
    longer_k: list[int] = field(default_factory=lambda: [12])
    problems: int = 150  # greedy accuracy: problems per k
    exposure_k: list[int] = field(default_factory=lambda: [6, 8, 10])
    exposure_prompts: int = 60  # ExAccErr: prompts (spread over exposure_k), student sampled at T=1
    exposure_max_len: int = 40
    weight_traces_per_style: int = 64  # per-style weight diagnostics on training traces
    batch_size: int = 256


@dataclass
class LabConfig:
    """The whole drift lab: teacher, traces, student prior, distillation arms x seeds, evaluation."""

    out_dir: str = "runs/drift-lab"
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8])
    workers: int = 2
    seq_length: int = 128
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    traces: TracesConfig = field(default_factory=TracesConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: StageConfig = field(default_factory=lambda: StageConfig(
        steps=250, global_batch_size=8, micro_batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=10))
    strong: StrongConfig = field(default_factory=StrongConfig)
    # the third condition: a scripted teacher that takes the student's untaken fork 80 % of the time
    # (verbose, the prior's style, only 20 %), over a long run: where a leaky weight flips the student
    skip_heavy: StrongConfig = field(default_factory=lambda: StrongConfig(
        styles={"verbose": 0.2, "skip2": 0.45, "skip3": 0.35}, count=1000, distill=StageConfig(
            steps=300, global_batch_size=8, micro_batch_size=8, lr=1e-3, min_lr=1e-4, warmup_steps=10)))
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: bool = True
    tracking_uri: str | None = None  # None: env MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db
    experiment: str = "dcd-drift-lab"
    data_seed: int = 0
    topk: int = 4  # teacher top-k per token stored with the traces (the entropy gate reads it); 0 = none

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            _fail("seeds", f"{self.seeds!r} must be non-empty and distinct", "use e.g. seeds=[1,2,3]")
        if self.workers < 1:
            _fail("workers", f"must be >= 1, got {self.workers}", "use 2 on a 2-core machine")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            _fail("arms", f"unknown arm(s) {unknown}", f"choose from {list(ARMS)}")
        if "sft" not in self.arms:
            _fail("arms", "must include 'sft' (every comparison is paired against it)", "add sft")
        if len(set(self.arms)) != len(self.arms):
            _fail("arms", f"{self.arms!r} repeats an arm", "list each arm once")
        if self.topk < 0:
            _fail("topk", f"must be >= 0, got {self.topk}", "use 0 (none) or e.g. 4")
        needs_topk = [a for a in self.arms if ARMS[a].loss.get("gate") == "entropy"]
        if needs_topk and self.topk == 0:
            _fail("topk", f"is 0 but arm(s) {needs_topk} read the teacher's top-k", "set topk=4 or drop those arms")
        _check_range("teacher.k", self.teacher.k)
        _check_range("traces.k", self.traces.k)
        _check_range("student.prior_k", self.student.prior_k)
        bad = [s for s in self.teacher.styles if s not in STYLES]
        if bad or not self.teacher.styles or any(w <= 0 for w in self.teacher.styles.values()):
            _fail("teacher.styles", f"{self.teacher.styles!r} needs positive weights on known styles",
                  f"use styles from {list(STYLES)}")
        if self.student.prior_style not in STYLES:
            _fail("student.prior_style", f"{self.student.prior_style!r} is unknown", f"use one of {list(STYLES)}")
        for name in ("strong", "skip_heavy"):
            _check_scripted(name, getattr(self, name))
        if self.traces.temperature <= 0:
            _fail("traces.temperature", f"must be > 0, got {self.traces.temperature}", "use 1.0")
        ev = self.eval
        for name in ("known_k", "new_k", "longer_k", "exposure_k"):
            ks = getattr(ev, name)
            if not ks or min(ks) < 2:
                _fail(f"eval.{name}", f"{ks!r} needs at least one digit count >= 2", f"use e.g. eval.{name}=[8]")
        for name in ("problems", "exposure_prompts", "exposure_max_len", "weight_traces_per_style", "batch_size"):
            if getattr(ev, name) < 1:
                _fail(f"eval.{name}", f"must be >= 1, got {getattr(ev, name)}", "use a positive count")
        for name, count in (("teacher.rows", self.teacher.rows), ("traces.count", self.traces.count),
                            ("student.prior_rows", self.student.prior_rows)):
            if count < 1:
                _fail(name, f"must be >= 1, got {count}", "use a positive count")
        longest = max(self.teacher.k[1], max(ev.longer_k), max(ev.new_k))
        if trace_tokens(longest) > self.seq_length:
            _fail("seq_length", f"{self.seq_length} is shorter than a verbose k={longest} trace "
                  f"({trace_tokens(longest)} tokens)", "raise seq_length or lower the largest k")

    @property
    def eval_groups(self) -> dict[str, list[int]]:
        """Digit counts by what they are to the student: known to the prior, new in the traces, longer."""
        return {"known": list(self.eval.known_k), "new": list(self.eval.new_k), "longer": list(self.eval.longer_k)}


def _check_scripted(name: str, sc: StrongConfig) -> None:
    """The settings of one scripted-teacher condition (`strong`, `skip_heavy`)."""
    _check_range(f"{name}.k", sc.k)
    bad = [s for s in sc.styles if s not in STYLES]
    if bad or not sc.styles or any(w < 0 for w in sc.styles.values()) or sum(sc.styles.values()) <= 0:
        _fail(f"{name}.styles", f"{sc.styles!r} needs non-negative weights on known styles, not all 0",
              f"use styles from {list(STYLES)}")
    eps = [*sc.result_eps.values(), sc.copy_eps]
    if set(sc.result_eps) != set(STYLES) or any(not 0 <= e < 0.5 for e in eps):
        _fail(f"{name}.result_eps", f"{sc.result_eps!r} (copy_eps {sc.copy_eps}) needs a rate "
              f"in [0, 0.5) for each of {list(STYLES)}", "use e.g. 0.01 to 0.05")
    if sc.count < 1:
        _fail(f"{name}.count", f"must be >= 1, got {sc.count}", "use a positive count")


def trace_tokens(k: int) -> int:
    """Tokens of BOS + prompt + the longest (verbose, all-9s) trace of k digits + EOS."""
    from dcd_megatron.lab.task import make_prompt, make_trace

    digits = "9" * k
    return 1 + len(make_prompt(digits)) + len(make_trace(digits, "verbose")) + 1


def tiny_lab_config(out_dir: str) -> LabConfig:
    """A miniature that exercises every stage in about a minute (the end-to-end test's lab)."""
    stage = dict(lr=3e-3, min_lr=1e-4, warmup_steps=2)
    return LabConfig(
        out_dir=out_dir,
        seeds=[1, 2],
        workers=2,
        seq_length=64,
        # mostly verbose: the tiny teacher keeps few traces, and the oracle arm needs some in the prior's style
        teacher=TeacherConfig(net=NetConfig(2, 32, 4, 2, 64), rows=400, k=[2, 4],
                              styles={"verbose": 0.8, "skip2": 0.1, "skip3": 0.1},
                              train=StageConfig(steps=60, global_batch_size=8, micro_batch_size=8,
                                                lr=1e-2, min_lr=1e-3, warmup_steps=5)),
        traces=TracesConfig(k=[2, 3], count=16),
        student=StudentConfig(net=NetConfig(1, 32, 4, 2, 64), prior_rows=100, prior_k=[2, 2], prior_per_seed=False,
                              prior_train=StageConfig(steps=6, global_batch_size=8, micro_batch_size=8, **stage)),
        distill=StageConfig(steps=4, global_batch_size=2, micro_batch_size=2, **stage),
        strong=StrongConfig(k=[2, 3], count=12, distill=StageConfig(steps=6, global_batch_size=2, micro_batch_size=2,
                                                                     **stage)),
        skip_heavy=StrongConfig(k=[2, 3], count=12, styles={"verbose": 0.2, "skip2": 0.45, "skip3": 0.35},
                                distill=StageConfig(steps=6, global_batch_size=2, micro_batch_size=2, **stage)),
        arms=["sft", "gated", "gated_entropy", "gated_ref_traj", "oracle"],
        eval=EvalConfig(known_k=[2], new_k=[3], longer_k=[4], problems=8, exposure_k=[3], exposure_prompts=6,
                        exposure_max_len=12, weight_traces_per_style=3, batch_size=16),
        experiment="dcd-drift-lab-test",
    )
