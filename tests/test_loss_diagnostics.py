"""The knowledge / fork diagnostics of the loss report, on hand-made batches with known values.

A token is teacher-certain (knowledge) when p_teacher(token) >= CERTAIN_P, a fork otherwise;
a certain token is unlearned while p_student(token) < UNLEARNED_P. Expected values are
written out from the probabilities below, not from the implementation.
"""

import math

import pytest
import torch

from dcd_megatron.loss import DCDConfig, make_loss_func, reduce_reports
from dcd_megatron.loss.report import CERTAIN_P, UNLEARNED_P

KEYS = ("certain_token_frac", "weight_mass_certain", "weight_mass_fork", "weight_certain_unlearned")
# (p_teacher, p_student) of the trained tokens; position 0 of each row is a masked-out prompt token
TOKENS = [(0.95, 0.3), (0.99, 0.8), (0.5, 0.1), (0.2, 0.6), (0.91, 0.45), (0.97, 0.97), (0.6, 0.7)]
TIS = DCDConfig(method="tis", alpha=1.0, clip=5.0, cap=10.0)  # u = p_student / p_teacher


def batch_of(tokens):
    """One row: a prompt token, then ``tokens``; logits whose softmax gives each p_student exactly."""
    n = len(tokens) + 1
    probs = torch.full((1, n, 3), 1.0 / 3, dtype=torch.float64)
    for t, (_, ps) in enumerate(tokens, start=1):
        probs[0, t] = torch.tensor([ps, (1 - ps) / 2, (1 - ps) / 2])
    teacher = torch.tensor([[-1.0] + [math.log(pt) for pt, _ in tokens]])
    mask = torch.tensor([[0.0] + [1.0] * len(tokens)])
    batch = {"labels": torch.zeros(1, n, dtype=torch.long), "loss_mask": mask, "teacher_logprobs": teacher}
    return batch, probs.log().float()


def expected(tokens, weight):
    """The four metrics written out in Python floats for weights ``weight(p_teacher, p_student)``."""
    u = [weight(pt, ps) for pt, ps in tokens]
    certain = [pt >= CERTAIN_P for pt, _ in tokens]
    unlearned = [c and ps < UNLEARNED_P for c, (_, ps) in zip(certain, tokens)]
    total, n = sum(u), len(tokens)
    return {
        "certain_token_frac": sum(certain) / n,
        "weight_mass_certain": sum(w for w, c in zip(u, certain) if c) / total,
        "weight_mass_fork": sum(w for w, c in zip(u, certain) if not c) / total,
        "weight_certain_unlearned": (sum(w for w, x in zip(u, unlearned) if x) / sum(unlearned)) / (total / n),
    }


def report_of(cfg, tokens, **kw):
    batch, logits = batch_of(tokens)
    return make_loss_func(cfg)(batch, logits, **kw)[2]


def test_thresholds_are_the_documented_ones():
    assert (CERTAIN_P, UNLEARNED_P) == (0.9, 0.5)


@pytest.mark.parametrize("cfg, weight", [
    (DCDConfig(method="sft"), lambda pt, ps: 1.0),
    (TIS, lambda pt, ps: ps / pt),
])
def test_exact_values_on_a_hand_made_batch(cfg, weight):
    got = reduce_reports([report_of(cfg, TOKENS)])
    want = expected(TOKENS, weight)
    # 4 certain tokens of 7 (0.95, 0.99, 0.91, 0.97); unlearned: 0.95 (p_s 0.3) and 0.91 (p_s 0.45)
    assert want["certain_token_frac"] == pytest.approx(4 / 7)
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    assert got["weight_mass_certain"] + got["weight_mass_fork"] == pytest.approx(1.0)


def test_gated_weights_lift_the_certain_mass_above_sigmoid():
    """What the method is for: the gate gives certain tokens more of the weight than sigmoid does."""
    sigmoid = reduce_reports([report_of(DCDConfig(method="sigmoid", tau=0.5, trajectory=False), TOKENS)])
    gated = reduce_reports([report_of(DCDConfig(method="gated", gate_power=16.0, tau=0.5, trajectory=False), TOKENS)])
    assert gated["weight_mass_certain"] > sigmoid["weight_mass_certain"] + 0.1
    assert gated["weight_certain_unlearned"] > 1.5 * sigmoid["weight_certain_unlearned"]


def test_reduction_over_micro_batches_is_over_tokens_not_a_mean_of_ratios():
    first, second = TOKENS[:2], TOKENS[2:]  # 2 and 5 tokens: a mean of ratios would differ
    reports = [report_of(TIS, first), report_of(TIS, second)]
    got = reduce_reports(reports)
    want = expected(TOKENS, lambda pt, ps: ps / pt)
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    per_micro = [reduce_reports([r])["weight_mass_certain"] for r in reports]
    assert abs(sum(per_micro) / 2 - got["weight_mass_certain"]) > 0.05


def test_chunked_path_reports_the_same_values():
    batch, logits = batch_of(TOKENS)
    # hidden states h_t = the logits row, output weight = identity: the same logits, made in chunks
    hidden, weight = logits.clone(), torch.eye(3)
    full = reduce_reports([make_loss_func(TIS)(batch, logits)[2]])
    chunked = reduce_reports([make_loss_func(TIS)(batch, hidden, output_weight=weight)[2]])
    for key in KEYS:
        assert chunked[key] == pytest.approx(full[key], rel=1e-6), key


def test_no_unlearned_certain_token_leaves_that_metric_out():
    learned = [(0.95, 0.9), (0.5, 0.1)]
    got = reduce_reports([report_of(TIS, learned)])
    assert "weight_certain_unlearned" not in got
    assert got["certain_token_frac"] == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["sft", "student_only"])
def test_no_teacher_gives_no_knowledge_metrics(method):
    batch, logits = batch_of(TOKENS)
    del batch["teacher_logprobs"]
    got = reduce_reports([make_loss_func(DCDConfig(method=method))(batch, logits)[2]])
    assert got["tokens"] == len(TOKENS)
    assert not set(KEYS) & set(got), sorted(set(KEYS) & set(got))


def test_a_micro_batch_without_teacher_does_not_dilute_the_others():
    """sft on traces where some lack teacher log-probs (NaN): the metrics cover the scored ones."""
    batch, logits = batch_of(TOKENS)
    unscored, unscored_logits = batch_of(TOKENS[:3])
    unscored["teacher_logprobs"] = torch.full_like(unscored["teacher_logprobs"], math.nan)
    fn = make_loss_func(DCDConfig(method="sft"))
    got = reduce_reports([fn(batch, logits)[2], fn(unscored, unscored_logits)[2]])
    want = expected(TOKENS, lambda pt, ps: 1.0)
    for key in KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_all_masked_batch_gives_no_knowledge_metrics():
    batch, logits = batch_of(TOKENS)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    got = reduce_reports([make_loss_func(TIS)(batch, logits)[2]])
    assert not set(KEYS) & set(got)


def test_knowledge_summary_reads_first_and_last_values():
    from dcd_megatron.loss.report import knowledge_summary

    curves = {
        "weight_mass_certain": ([1, 5], [0.5, 0.625]),
        "weight_mass_fork": ([1, 5], [0.5, 0.375]),
        "weight_certain_unlearned": ([5], [0.25]),
        "certain_token_frac": ([1, 5], [0.5, 0.4]),
    }
    lines = knowledge_summary(curves)
    assert lines[0] == "knowledge vs forks (teacher-certain tokens, p_teacher >= 0.9; 40.0% of trained tokens at the last step):"
    assert lines[1] == "  weight_mass_certain      0.5000 (step 1) -> 0.6250 (step 5)"
    assert lines[3] == "  weight_certain_unlearned 0.2500 (step 5)"
    assert "p_student < 0.5" in lines[4] and "falling towards 0 means the loss is starving knowledge" in lines[4]
    assert len(lines) == 5
    assert knowledge_summary({}) == [] and knowledge_summary({"certain_token_frac": ([1], [0.5])}) == []
    assert len(knowledge_summary({"weight_mass_fork": ([1], [0.5])})) == 2  # no unlearned line, no sentence
