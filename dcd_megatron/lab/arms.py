"""The lab's arms: named DCD loss settings distilled on the same traces, steps and seeds.

Each arm is a DCDConfig (see docs/loss.md) plus a one-line description for the report.
A schedule arm's anneal length is a fraction of the run's steps, so it scales with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dcd_megatron.loss import DCDConfig


@dataclass(frozen=True)
class Arm:
    """One distillation setting: DCDConfig fields, and what it is for the report."""

    description: str
    loss: dict = field(default_factory=dict)
    anneal_fraction: float = 0.0  # > 0: tau goes linearly to loss["tau_end"] over this share of steps
    only_style: bool = False  # train only on the traces in the prior's style (a filter, not a loss)


ARMS: dict[str, Arm] = {
    "sft": Arm("plain SFT (every weight 1)", {"method": "sft"}),
    "sigmoid_sharp": Arm("sigmoid of the log-ratio, tau=0.5 (sharp)", {"method": "sigmoid", "tau": 0.5}),
    "sigmoid": Arm("sigmoid of the log-ratio, tau=1 (the old default)", {"method": "sigmoid", "tau": 1.0}),
    "sigmoid_soft": Arm("sigmoid of the log-ratio, tau=2 (soft)", {"method": "sigmoid", "tau": 2.0}),
    "student_only": Arm("sigmoid of the student log-prob alone, tau=1", {"method": "student_only", "tau": 1.0}),
    "tis": Arm("truncated importance ratio min(p_s/p_t, 2)", {"method": "tis", "cap": 2.0}),
    "prefix": Arm("exp of the mean log-ratio over the prefix, capped at 2", {"method": "prefix"}),
    "sequence": Arm("exp of the trace's mean log-ratio, self-normalised over the batch", {"method": "sequence"}),
    "anneal": Arm("sigmoid, tau annealed 0.5 -> 2 over the first half of the steps",
                  {"method": "sigmoid", "tau": 0.5, "tau_end": 2.0}, anneal_fraction=0.5),
    "floor": Arm("sigmoid tau=0.5 with every weight floored at 0.1",
                 {"method": "sigmoid", "tau": 0.5, "floor": 0.1}),
    "dft": Arm("DFT: the student's own probability of the token (student_only power, beta=1; TRL's dft)",
               {"method": "student_only", "student_only_form": "power", "beta": 1.0}),
    "gated": Arm("gated: p_T**16 + (1 - p_T**16) sigmoid(l / 0.5): full weight where the teacher was sure",
                 {"method": "gated", "gate": "token", "gate_power": 16.0, "tau": 0.5}),
    "gated_soft": Arm("gated as above with tau=1", {"method": "gated", "gate": "token", "gate_power": 16.0, "tau": 1.0}),
    "gated_leaky": Arm("gated with gate_power=4, tau=0.5 (a leakier gate)",
                       {"method": "gated", "gate": "token", "gate_power": 4.0, "tau": 0.5}),
    "gated_entropy": Arm("gated with the entropy gate exp(-8 H_T) (H over the teacher's top-k + rest), tau=0.5",
                         {"method": "gated", "gate": "entropy", "gate_power": 8.0, "tau": 0.5}),
    "gated_traj": Arm("gated with the trajectory discount: each weight times the product of the earlier tokens' "
                      "fork factors g + (1 - g) min(1, 2 sigmoid(l / 0.5))",
                      {"method": "gated", "gate": "token", "gate_power": 16.0, "tau": 0.5, "trajectory": True}),
    "gated_ref": Arm("gated with l from the frozen initial student (the prior, scored once over the traces)",
                     {"method": "gated", "gate": "token", "gate_power": 16.0, "tau": 0.5, "reference": "initial"}),
    "gated_ref_traj": Arm("gated_ref with the trajectory discount",
                          {"method": "gated", "gate": "token", "gate_power": 16.0, "tau": 0.5, "reference": "initial",
                           "trajectory": True}),
    "oracle": Arm("SFT on the prior's style only (an oracle filter of the traces, not a method)",
                  {"method": "sft"}, only_style=True),
}
# The published lab's arms: today's candidates, the baselines a user would pick instead, references.
DEFAULT_ARMS: tuple[str, ...] = ("sft", "dft", "gated", "gated_traj", "gated_ref", "gated_ref_traj", "oracle")


def needs_reference(name: str) -> bool:
    """Whether arm `name` reads the initial student's log-probs (its traces are scored by the prior first)."""
    return ARMS[name].loss.get("reference") == "initial"


def arm_loss(name: str, steps: int) -> DCDConfig:
    """The DCDConfig of arm `name` for a run of `steps` optimizer steps."""
    if name not in ARMS:
        raise ValueError(f"unknown lab arm {name!r}; choose from {list(ARMS)}")
    arm = ARMS[name]
    # an arm is what it says, whatever the defaults are: the reference and the trajectory are explicit
    kwargs = {"reference": "live", "trajectory": False, **arm.loss}
    if arm.anneal_fraction > 0:
        kwargs["tau_anneal_steps"] = max(1, round(arm.anneal_fraction * steps))
    return DCDConfig(**kwargs)
