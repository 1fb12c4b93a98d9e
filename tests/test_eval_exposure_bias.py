"""AccErr / ExAccErr (Arora et al. 2022) on constructed examples with known answers."""

import math

import pytest
import torch

from dcd_megatron.eval.exposure_bias import (
    cumulative_step_loss,
    exposure_bias_curve,
    measure_exposure_bias,
    step_disagreement,
    step_kl,
)


def test_step_kl_and_disagreement_by_hand():
    one_hot = torch.tensor([0.0, -math.inf, -math.inf])  # the oracle knows the next token is 0
    model = torch.tensor([0.6, 0.3, 0.1]).log()
    assert step_kl(one_hot, model).item() == pytest.approx(-math.log(0.6))
    o = torch.tensor([0.5, 0.5]).log()
    h = torch.tensor([0.25, 0.75]).log()
    assert step_kl(o, h).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    assert step_kl(o, o).item() == pytest.approx(0.0)
    assert step_disagreement(one_hot, model).item() == 0.0
    assert step_disagreement(one_hot, torch.tensor([0.2, 0.7, 0.1]).log()).item() == 1.0


def test_cumulative_loss_over_ragged_rollouts():
    losses = [[1.0, 1.0, 1.0], [2.0]]
    reached, n = cumulative_step_loss(losses, 4, "reached")
    assert reached[:3].tolist() == [1.5, 2.0, 3.0] and math.isnan(reached[3])
    assert n.tolist() == [2, 1, 1, 0]
    absorbing, _ = cumulative_step_loss(losses, 3, "absorbing")
    assert absorbing.tolist() == [1.5, 2.0, 2.5]


def test_no_exposure_bias_means_linear_accumulation():
    losses = [[0.2, 0.1, 0.3, 0.4], [0.1, 0.1]]
    curve = exposure_bias_curve(losses, losses)
    assert curve.acc_err == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert curve.ex_acc_err_pct == pytest.approx([0.0] * 4)


def test_compounding_errors_match_the_closed_form():
    # Oracle prefixes: error e at every step. Own prefixes: once wrong, always wrong, so the
    # expected step loss is 1 - (1-e)^t and R_<=l = l - (1-e)(1 - (1-e)^l) / e.
    e, L = 0.1, 20
    own = [[1 - (1 - e) ** t for t in range(1, L + 1)]]
    oracle = [[e] * L]
    curve = exposure_bias_curve(own, oracle)
    for l in (1, 5, 20):
        r = l - (1 - e) * (1 - (1 - e) ** l) / e
        assert curve.at(l)["acc_err"] == pytest.approx(r / e)
        assert curve.at(l)["ex_acc_err_pct"] == pytest.approx((r / (l * e) - 1) * 100)
    assert curve.at(1)["ex_acc_err_pct"] == pytest.approx(0.0)
    assert curve.acc_err[-1] > L  # super-linear


# --- the driver on a constructed model / oracle pair ---------------------------------------------
GOOD, BAD, BOS, EOS = 0, 1, 2, 3
K = 2  # the model's one mistake: on a clean prefix it prefers BAD at response step K


def oracle_fn(tokens):
    """Always GOOD, with certainty."""
    logits = torch.full((*tokens.shape, 4), -math.inf)
    logits[..., GOOD] = 0.0
    return logits


def model_fn(tokens):
    """p(GOOD) = 0.6 on clean prefixes (0.4 at step K); 0.1 once a BAD token was written."""
    b, t = tokens.shape
    p_good = torch.full((b, t), 0.6)
    if t > K:
        p_good[:, K] = 0.4  # position K predicts response step K (the prompt is one BOS token)
    dirty = (tokens == BAD).cumsum(dim=1) > 0
    p_good[dirty] = 0.1
    logits = torch.full((b, t, 4), -math.inf)
    logits[..., GOOD] = p_good.log()
    logits[..., BAD] = (1 - p_good).log()
    return logits


def test_driver_greedy_kl_matches_the_hand_derivation():
    a, b, c = -math.log(0.6), -math.log(0.4), -math.log(0.1)
    # greedy own rollout: GOOD, GOOD, BAD (step K), then BAD forever (dirty prefix)
    own = [a, a, b, c, c, c]
    # greedy oracle rollout: GOOD x 6, on which the model only errs at step K
    ref = [a, a, b, a, a, a]
    curve = measure_exposure_bias(model_fn, oracle_fn, [[BOS]] * 3, max_len=6, eos_id=EOS, temperature=0.0)
    for l in range(1, 7):
        r, o = sum(own[:l]), sum(ref[:l])
        assert curve.model_prefix_error[l - 1] == pytest.approx(r)
        assert curve.eps[l - 1] == pytest.approx(o / l)
        assert curve.acc_err[l - 1] == pytest.approx(r / (o / l))
        assert curve.ex_acc_err_pct[l - 1] == pytest.approx((r / o - 1) * 100)
    assert curve.n_model == [3] * 6


def test_driver_disagreement_loss_with_teacher_traces():
    traces = [[GOOD] * 6, [GOOD] * 3]  # teacher traces of different lengths
    curve = measure_exposure_bias(model_fn, oracle_fn, [[BOS], [BOS]], max_len=6, eos_id=EOS, temperature=0.0,
                                  oracle_responses=traces, loss="disagreement")
    # on teacher prefixes the model disagrees only at step K; on its own from step K on
    assert curve.n_oracle == [2, 2, 2, 1, 1, 1]
    assert math.isnan(curve.acc_err[0]) and math.isnan(curve.acc_err[1])  # eps = 0: undefined
    assert curve.eps[5] == pytest.approx(1 / 6)
    assert curve.acc_err[5] == pytest.approx(4 / (1 / 6))
    assert curve.ex_acc_err_pct[5] == pytest.approx(300.0)
    logged = {}
    curve.log(lambda m, step: logged.update({step: m}))
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert logged[1] == {"exposure_bias/eps": 0.0}  # undefined ratios are left out, not logged as NaN
    assert logged[6]["exposure_bias/ex_acc_err_pct"] == pytest.approx(300.0)


def test_driver_sampled_rollouts_run_and_are_seeded():
    kw = dict(max_len=5, eos_id=EOS, temperature=1.0, seed=4, batch_size=4)
    a = measure_exposure_bias(model_fn, oracle_fn, [[BOS]] * 8, **kw)
    b = measure_exposure_bias(model_fn, oracle_fn, [[BOS]] * 8, **kw)
    assert a == b
    assert all(math.isfinite(x) for x in a.acc_err)
    assert a.ex_acc_err_pct[-1] > 0  # its own mistakes make it worse than on oracle prefixes
