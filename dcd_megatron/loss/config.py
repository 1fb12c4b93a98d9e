"""DCDConfig: which per-token weight the distillation loss uses and how it is normalised.

Validated at construction: every error names the field and says how to fix it. Defaults and
the reasons for them are in docs/loss.md ("Defaults").
"""

import dataclasses
import math
from typing import Literal

from dcd_megatron.errors import UserError

Method = Literal["sft", "sigmoid", "student_only", "tis", "prefix", "sequence", "gated"]
METHODS: tuple[str, ...] = ("sft", "sigmoid", "student_only", "tis", "prefix", "sequence", "gated")
# Methods whose weights are a function of the teacher log-probs.
NEEDS_TEACHER: frozenset[str] = frozenset({"sigmoid", "tis", "prefix", "sequence", "gated"})
GATES: tuple[str, ...] = ("token", "entropy")
REFERENCES: tuple[str, ...] = ("live", "initial", "auto")
# Methods whose weights read the student's log-prob (every one but sft).
READS_STUDENT: frozenset[str] = frozenset(METHODS) - {"sft"}
# Methods with a fork factor for the trajectory discount: sigmoid-shaped in the log-ratio.
TRAJECTORY_METHODS: tuple[str, ...] = ("sigmoid", "gated")
NORMALIZE_SCOPES: tuple[str, ...] = ("global", "micro", "none")


class DCDConfigError(UserError, ValueError):
    """A DCDConfig field has an invalid value."""


def _fail(field: str, problem: str, fix: str) -> None:
    raise DCDConfigError(f"DCDConfig.{field}: {problem}; {fix}")


def _check_choice(field: str, value, choices) -> None:
    if value not in choices:
        _fail(field, f"{value!r} is not one of {list(choices)}", f"set {field} to one of them")


def _check_finite(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, f"expected a finite number, got {value!r}", f"set {field} to a finite number")


@dataclasses.dataclass(frozen=True)
class DCDConfig:
    """Per-token weight family of the method; docs/loss.md has the method and each formula."""

    # the per-token weight (see docs/loss.md for each formula)
    method: Method = "gated"
    # the weighted per-token term: nll = -log p_student(teacher token); topk_kl = KL over the
    # teacher's top-k plus a residual bucket (needs data.topk and top-k in the traces)
    term: Literal["nll", "topk_kl"] = "nll"
    # sigmoid-shaped weights: sigma((z - bias) / tau) with z the clipped statistic
    tau: float = 0.5
    bias: float = 0.0  # the sigmoid's centre, in log-ratio units
    bias_mode: Literal["fixed", "median"] = "fixed"  # median: the micro-batch median of the clipped statistic
    # z = clip(statistic, -clip, clip): the log-ratio (or student log-prob) clip
    clip: float = 5.0
    # every non-sft weight is clamped to [floor, cap] before normalisation
    floor: float = 0.0
    cap: float = 2.0  # the largest raw weight (tis, prefix, sequence, and the clamp of every method)
    # tis: min(exp(alpha * clip(l)), cap)
    alpha: float = 1.0
    # student_only: sigmoid of the clipped student log-prob, or p**beta (the DFT limit)
    student_only_form: Literal["sigmoid", "power"] = "sigmoid"
    beta: float = 1.0  # student_only power form: p**beta
    # prefix: transform of the clipped mean of l over the prefix (0 = whole prefix, k = last k)
    prefix_transform: Literal["exp", "sigmoid"] = "exp"
    prefix_window: int = 0  # prefix: 0 = the whole prefix, k = the last k response tokens
    # gated: u = g + (1 - g) * sigmoid((clip(l) - bias) / tau) with the teacher-confidence gate
    # g = p_teacher(token) ** gate_power ("token") or exp(-gate_power * H_teacher) ("entropy",
    # H over the teacher's top-k plus a residual bucket: needs data.topk)
    gate: Literal["token", "entropy"] = "token"
    # gated: the gate's sharpness; 0 = plain SFT, larger keeps full weight only where the teacher was sure
    gate_power: float = 16.0
    # the student the weights compare with the teacher: live = the model being trained;
    # initial = the checkpoint the run starts from, frozen (the traces' student_ref_logprobs
    # column, scored once: dcd-score --reference); auto = initial when the traces carry that
    # column, else live without the trajectory discount (said at start). Ignored by sft.
    reference: Literal["live", "initial", "auto"] = "auto"
    # multiply each weight by the product over the earlier response tokens of its document of
    # the fork factor f = g + (1 - g) * min(1, 2 sigmoid((clip(l) - bias) / tau)): a fork the
    # student rejects discounts the rest of that trace (sigmoid and gated; ignored by the others; g = 0 for sigmoid)
    trajectory: bool = True
    # where the weights are made mean-1: global batch, micro-batch, or not at all
    normalize: Literal["global", "micro", "none"] = "global"
    # tau schedule: linear from tau to tau_end over tau_anneal_steps optimizer steps
    tau_end: float | None = None
    tau_anneal_steps: int = 0  # optimizer steps of the tau anneal (0 = constant tau)
    # memory-bounded loss: the model hands the loss its final hidden states and the loss makes
    # and consumes the logits chunk_size tokens at a time (docs/performance.md); 0 = the full
    # [b, s, V/tp] logits. Both terms (nll, topk_kl) are exact on either path.
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks run at construction; call again after changing fields in place."""
        _check_choice("method", self.method, METHODS)
        _check_choice("term", self.term, ("nll", "topk_kl"))
        for name in ("tau", "bias", "clip", "floor", "cap", "alpha", "beta", "gate_power"):
            _check_finite(name, getattr(self, name))
        if self.tau <= 0:
            _fail("tau", f"must be > 0, got {self.tau}", "use a positive temperature such as 1.0")
        _check_choice("bias_mode", self.bias_mode, ("fixed", "median"))
        if self.clip <= 0:
            _fail("clip", f"must be > 0, got {self.clip}", "use a positive log-ratio clip such as 5.0")
        if self.floor < 0:
            _fail("floor", f"must be >= 0, got {self.floor}", "use 0 for no floor")
        if self.cap <= 0:
            _fail("cap", f"must be > 0, got {self.cap}", "use a positive cap such as 2.0")
        if self.floor > self.cap:
            _fail("floor", f"{self.floor} is above cap {self.cap}", "choose floor <= cap")
        if self.alpha <= 0:
            _fail("alpha", f"must be > 0, got {self.alpha}", "use a positive exponent such as 1.0")
        _check_choice("student_only_form", self.student_only_form, ("sigmoid", "power"))
        if self.beta <= 0:
            _fail("beta", f"must be > 0, got {self.beta}", "use a positive power such as 1.0")
        _check_choice("gate", self.gate, GATES)
        if self.gate_power < 0:
            _fail("gate_power", f"must be >= 0, got {self.gate_power}", "use 0 (plain SFT) or a power such as 16")
        _check_choice("prefix_transform", self.prefix_transform, ("exp", "sigmoid"))
        if isinstance(self.prefix_window, bool) or not isinstance(self.prefix_window, int) or self.prefix_window < 0:
            _fail(
                "prefix_window",
                f"must be an integer >= 0, got {self.prefix_window!r}",
                "use 0 for the whole prefix or k > 0 for the last k response tokens",
            )
        _check_choice("reference", self.reference, REFERENCES)
        if not isinstance(self.trajectory, bool):
            _fail("trajectory", f"expected true or false, got {self.trajectory!r}", "set trajectory=true or false")
        _check_choice("normalize", self.normalize, NORMALIZE_SCOPES)
        if self.tau_end is not None:
            _check_finite("tau_end", self.tau_end)
            if self.tau_end <= 0:
                _fail("tau_end", f"must be > 0, got {self.tau_end}", "use a positive final temperature or None")
        if isinstance(self.tau_anneal_steps, bool) or not isinstance(self.tau_anneal_steps, int) or self.tau_anneal_steps < 0:
            _fail("tau_anneal_steps", f"must be an integer >= 0, got {self.tau_anneal_steps!r}", "use 0 for none")
        if self.tau_end is not None and self.tau_anneal_steps == 0:
            _fail(
                "tau_anneal_steps",
                "is 0 while tau_end is set",
                "set tau_anneal_steps to the number of optimizer steps of the anneal, or tau_end to None",
            )
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            _fail("chunk_size", f"must be an integer >= 0, got {self.chunk_size!r}",
                  "use 0 for the full logits or a token count such as 1024")

    @property
    def needs_teacher(self) -> bool:
        """Whether this method's weights need teacher log-probs."""
        return self.method in NEEDS_TEACHER

    @property
    def uses_trajectory(self) -> bool:
        """Whether the weights take the trajectory discount (asked for, and the method has a fork factor)."""
        return self.trajectory and self.method in TRAJECTORY_METHODS

    @property
    def needs_reference(self) -> bool:
        """Whether the weights read the frozen initial student's log-probs (``student_ref_logprobs``)."""
        return self.reference == "initial" and self.method in READS_STUDENT

    def resolved(self, traces_have_reference: bool) -> "DCDConfig":
        """This config with ``reference="auto"`` made ``initial`` by traces that carry the initial student's
        log-probs, else ``live`` without the trajectory discount: the drift lab's best arm that needs no
        reference column (the live trajectory loses to SFT where the teacher prefers the untaken fork)."""
        if self.reference != "auto":
            return self
        if traces_have_reference:
            return dataclasses.replace(self, reference="initial")
        return dataclasses.replace(self, reference="live", trajectory=False)

    @property
    def entropy_gate(self) -> bool:
        """Whether the weights read the teacher's top-k (the gated method's entropy gate)."""
        return self.method == "gated" and self.gate == "entropy"

    @property
    def chunked(self) -> bool:
        """Whether the loss is computed from hidden states a chunk of tokens at a time."""
        return self.chunk_size > 0

    def tau_at(self, step: int) -> float:
        """The temperature at optimizer step ``step``: linear from tau to tau_end, then constant."""
        if self.tau_end is None:
            return self.tau
        frac = min(max(step, 0) / self.tau_anneal_steps, 1.0)
        return self.tau + (self.tau_end - self.tau) * frac
