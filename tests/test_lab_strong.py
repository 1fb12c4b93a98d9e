"""The drift lab's strong condition and its decision: the scripted teacher's exact log-probs, the default rule."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from dcd_megatron.lab import task
from dcd_megatron.lab.scripted import EOS, ScriptedTeacher, greedy_accuracy, scripted_traces
from dcd_megatron.lab.stats import choose_default, oracle_share


def _all_continuations(teacher: ScriptedTeacher, digits: str) -> dict[str, float]:
    """Every correct trace and its probability of being drawn and kept (product of token probs)."""
    out = {}
    for style in task.STYLES:
        response = task.make_trace(digits, style)
        out[response] = math.exp(sum(teacher.logprobs(digits, response)))
    return out


@pytest.mark.parametrize("digits", ["35", "352", "3527", "35272190"])
def test_style_fork_probabilities_sum_to_one_at_every_prefix(digits):
    teacher = ScriptedTeacher()
    traces = {t for t in teacher.traces(digits).values()}
    prefixes = {t[:i] for t in traces for i in range(len(t))}
    for prefix in prefixes:
        nxt = {t[len(prefix)] for t in traces if t.startswith(prefix)}
        total = sum(teacher._mass(teacher.traces(digits), prefix + ch) for ch in nxt)
        assert total == pytest.approx(teacher._mass(teacher.traces(digits), prefix))


def test_logprobs_are_those_of_the_distribution_the_traces_are_drawn_from():
    teacher = ScriptedTeacher(styles={"verbose": 0.2, "skip2": 0.5, "skip3": 0.3})
    digits = "3527"
    expected = _all_continuations(teacher, digits)  # kept-trace probabilities
    rng = random.Random(0)
    n = 20000
    counts = Counter()
    for _ in range(n):
        response, ok = teacher.sample(digits, rng)
        if ok:
            counts[response] += 1
    for response, p in expected.items():
        se = math.sqrt(p * (1 - p) / n)
        assert abs(counts[response] / n - p) < 4 * se + 1e-9, (response, counts[response] / n, p)


def test_merged_styles_share_one_trace_and_its_probability():
    teacher = ScriptedTeacher(styles={"verbose": 0.2, "skip2": 0.5, "skip3": 0.3})
    # k=3: skip2 and skip3 write the same trace, so its fork token carries both styles' mass
    lp = teacher.logprobs("352", task.make_trace("352", "skip2"))
    assert math.exp(lp[3]) == pytest.approx(0.8 * (1 - teacher.copy_eps))
    assert len(lp) == len(task.make_trace("352", "skip2")) + 1  # one per response token plus EOS
    # k=2: every style is the same trace: no fork at all
    assert all(math.exp(x) > 0.98 for x in teacher.logprobs("35", "3+5=8>8"))


def test_knowledge_tokens_are_sure_and_forks_are_spread():
    teacher = ScriptedTeacher()
    for style in task.STYLES:
        response = task.make_trace("35272190", style)
        probs = [math.exp(x) for x in teacher.logprobs("35272190", response)]
        forks = [i for i, p in enumerate(probs) if p < 0.9]
        assert forks and all(i in (3, 5) for i in forks), (style, forks)  # only the style-choosing tokens
        assert min(p for i, p in enumerate(probs) if i not in forks) >= 1 - max(teacher.result_eps.values())


def test_greedy_is_always_right_and_kept_traces_are_correct():
    teacher = ScriptedTeacher()
    rng = random.Random(1)
    problems = {k: [task.random_digits(rng, k) for _ in range(30)] for k in (2, 5, 10)}
    acc = greedy_accuracy(teacher, problems)
    assert all(a["correct"] == a["n"] == 30 for a in acc.values())
    rows, stats = scripted_traces(teacher, [d for ds in problems.values() for d in ds], seed=0)
    assert stats["drawn"] == 90 and len(rows) + stats["dropped"]["wrong"] == 90 and rows
    for row in rows:
        digits = row["prompt"].rstrip(":")
        assert task.is_correct(digits, row["response"]) and task.first_error(digits, row["response"]) is None
        assert row["teacher_logprobs"] == [round(x, 6) for x in teacher.logprobs(digits, row["response"])]
    assert EOS not in "".join(r["response"] for r in rows)


def _groups(known, known_verdict, new, new_verdict):
    return {"groups": {"known": {"diff_mean": known, "verdict": known_verdict},
                       "new": {"diff_mean": new, "verdict": new_verdict}}}


def test_the_default_is_the_largest_gain_among_arms_never_worse_on_known_or_new():
    summaries = {
        "trained": {"sft": _groups(0, "reference", 0, "reference"),
                    "a": _groups(0.30, "better", -0.20, "worse"),  # the biggest known gain, but starves: out
                    "b": _groups(0.10, "better", 0.00, "tie"),
                    "c": _groups(0.05, "tie", 0.02, "tie"),
                    "d": _groups(0.40, "better", 0.10, "better"),
                    "oracle": _groups(0.50, "better", 0.1, "better")},  # a reference, never chosen
        "strong": {"sft": _groups(0, "reference", 0, "reference"),
                   "a": _groups(0.30, "better", 0.0, "tie"),
                   "b": _groups(0.20, "better", -0.01, "tie"),
                   "c": _groups(0.05, "tie", 0.0, "tie"),
                   "d": _groups(0.40, "better", 0.10, "better"),
                   "oracle": _groups(0.50, "better", 0.1, "better")},
        "skip_heavy": {"sft": _groups(0, "reference", 0, "reference"),
                       "a": _groups(0.10, "better", 0.0, "tie"),
                       "b": _groups(0.10, "better", 0.0, "tie"),
                       "c": _groups(0.05, "tie", 0.0, "tie"),
                       "d": _groups(-0.10, "worse", 0.0, "tie"),  # flips the student where the teacher forks away
                       "oracle": _groups(0.60, "better", 0.1, "better")},
    }
    out = choose_default(summaries)
    assert out["choice"] == "b", out
    assert out["table"]["a"]["qualifies"] is False and out["table"]["d"]["qualifies"] is False
    # the gain: the mean over conditions of the mean of the known and new gains
    assert out["table"]["b"]["gain"] == pytest.approx(((0.10 + 0.0) / 2 + (0.20 - 0.01) / 2 + 0.05) / 3)
    assert "oracle" not in out["table"] and "sft" not in out["table"]
    # the goal is reported, not required: b gets 0 of the oracle's new gain in `trained`
    assert "trained: new 0.00 of the oracle's gain < 0.5" in out["table"]["b"]["missed"]
    assert "misses the goal" in out["why"]
    assert oracle_share(summaries["strong"], "d", "known") == pytest.approx(0.8)
    assert not [m for m in out["table"]["d"]["missed"] if "skip_heavy" in m]  # the guard condition has no goal
    # an arm missing from one condition cannot qualify; no positive gain left -> sft
    del summaries["strong"]["b"]
    for name in summaries:
        summaries[name]["c"] = _groups(-0.01, "tie", 0.0, "tie")
    out = choose_default(summaries)
    assert out["choice"] == "sft" and "SFT-safe" in out["why"]


def test_scripted_topk_holds_the_sampled_token_and_sums_below_one():
    teacher = ScriptedTeacher()
    digits = "3527219"
    for style in task.STYLES:
        response = task.make_trace(digits, style)
        ids, lps = teacher.topk(digits, response, 4)
        token_lps = teacher.logprobs(digits, response)
        text = response + EOS
        assert len(ids) == len(lps) == len(text)
        for t, ch in enumerate(text):
            assert len(ids[t]) == 4 and lps[t] == sorted(lps[t], reverse=True)
            assert task.token_id(ch) in ids[t]  # the written token is among the top-k ...
            assert lps[t][ids[t].index(task.token_id(ch))] == pytest.approx(token_lps[t], abs=1e-5)  # ... exactly
            assert sum(math.exp(x) for x in lps[t]) <= 1 + 1e-6
    # at the fork both continuations are in the top-2, with the mixture's shares
    ids, lps = teacher.topk(digits, task.make_trace(digits, "verbose"), 2)
    assert {ids[3][0], ids[3][1]} == {task.token_id("="), task.token_id("+")}


def test_entropy_of_scripted_topk_separates_forks_from_knowledge():
    import torch

    from dcd_megatron.loss.weights import teacher_entropy

    teacher = ScriptedTeacher()
    response = task.make_trace("35272190", "skip2")
    _, lps = teacher.topk("35272190", response, 4)
    h = teacher_entropy(torch.tensor(lps)).tolist()
    forks = [3, 5]
    assert min(h[i] for i in forks) > 0.4 and max(h[i] for i in range(len(h)) if i not in forks) < 0.3


def test_arms_that_need_the_top_k_are_shown_but_never_the_default():
    summaries = {c: {"sft": _groups(0, "reference", 0, "reference"),
                     "needs_k": _groups(0.40, "better", 0.1, "better"),
                     "plain": _groups(0.20, "better", 0.0, "tie")} for c in ("trained", "strong")}
    out = choose_default(summaries, needs_topk=frozenset({"needs_k"}))
    assert out["choice"] == "plain" and out["table"]["needs_k"]["eligible"] is False
    assert out["table"]["needs_k"]["qualifies"] is True
