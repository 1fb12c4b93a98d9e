"""DCDConfig: every invalid value is refused with a message naming its field; the tau schedule."""

import pytest

from dcd_megatron.configs import apply_overrides, from_dict, to_dict
from dcd_megatron.loss import DCDConfig, DCDConfigError

INVALID = [
    ("method", "kl"),
    ("tau", 0.0),
    ("tau", float("nan")),
    ("bias", float("inf")),
    ("bias_mode", "mean"),
    ("clip", -1.0),
    ("floor", -0.1),
    ("cap", 0.0),
    ("alpha", 0.0),
    ("student_only_form", "linear"),
    ("beta", -2.0),
    ("prefix_transform", "tanh"),
    ("prefix_window", -1),
    ("gate", "probability"),
    ("gate_power", -1.0),
    ("gate_power", float("nan")),
    ("gate_power", float("inf")),
    ("normalize", "batch"),
    ("tau_end", 0.0),
    ("tau_anneal_steps", -5),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v}" for f, v in INVALID])
def test_invalid_value_names_its_field(field, value):
    with pytest.raises(DCDConfigError, match=rf"DCDConfig\.{field}\b"):
        DCDConfig(**{field: value})


def test_floor_above_cap_is_refused():
    with pytest.raises(DCDConfigError, match=r"DCDConfig\.floor.*cap"):
        DCDConfig(floor=3.0, cap=2.0)


def test_tau_end_needs_anneal_steps():
    with pytest.raises(DCDConfigError, match=r"DCDConfig\.tau_anneal_steps"):
        DCDConfig(tau_end=2.0)


def test_tau_schedule_is_linear_then_constant():
    cfg = DCDConfig(tau=0.5, tau_end=2.5, tau_anneal_steps=100)
    assert cfg.tau_at(0) == pytest.approx(0.5)
    assert cfg.tau_at(25) == pytest.approx(1.0)
    assert cfg.tau_at(100) == pytest.approx(2.5)
    assert cfg.tau_at(10_000) == pytest.approx(2.5)
    assert DCDConfig(tau=0.7).tau_at(500) == 0.7


def test_defaults_are_valid_and_round_trip_through_overrides():
    cfg = DCDConfig()
    assert cfg.method == "gated" and cfg.normalize == "global"
    assert from_dict(DCDConfig, to_dict(cfg)) == cfg
    changed = apply_overrides(cfg, ["method=tis", "cap=3", "tau_end=2.0", "tau_anneal_steps=10"])
    assert (changed.method, changed.cap, changed.tau_end, changed.tau_anneal_steps) == ("tis", 3.0, 2.0, 10)
    with pytest.raises(ValueError, match="method"):
        apply_overrides(cfg, ["method=nope"])


def test_gate_messages_name_the_fix():
    with pytest.raises(DCDConfigError, match=r"DCDConfig\.gate_power.*use 0 \(plain SFT\)"):
        DCDConfig(method="gated", gate_power=-2.0)
    with pytest.raises(DCDConfigError, match=r"DCDConfig\.gate\b.*token.*entropy"):
        DCDConfig(method="gated", gate="prob")
    assert DCDConfig(method="gated", gate="entropy").entropy_gate
    assert not DCDConfig(method="sigmoid", gate="entropy").entropy_gate  # only the gated method reads it
    assert DCDConfig(method="gated").needs_teacher


def test_the_default_is_the_loss_the_published_drift_lab_chose():
    """docs/results.md names the arm the lab's rule chose; DCDConfig() must be that arm's loss."""
    import re
    from pathlib import Path

    from dcd_megatron.lab.arms import ARMS

    text = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    chosen = re.search(r"\*\*Chosen by this run: `([a-z_]+)`\.\*\*", text).group(1)
    default = DCDConfig()
    for field, value in ARMS[chosen].loss.items():
        if field == "reference" and value == "initial":  # the lab's traces carry the column: auto is initial there
            assert default.reference == "auto" and default.resolved(traces_have_reference=True).reference == "initial"
            continue
        assert getattr(default, field) == value, (chosen, field, getattr(default, field), value)
    fallback = DCDConfig().resolved(traces_have_reference=False)  # the documented fallback: the lab's `gated`
    assert (fallback.reference, fallback.trajectory) == ("live", False)
    assert DCDConfig(reference="live").resolved(traces_have_reference=False).trajectory is True  # asked for: kept
