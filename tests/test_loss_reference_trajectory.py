"""The frozen-reference weights (`loss.reference=initial`) and the trajectory discount (`loss.trajectory`):
closed forms, packing resets, no length bias where the student agrees, the fused chunked scheme, clear errors.
(Their CP / TP / DP exactness is in test_loss_parallel.py and test_loss_chunked.py beside every method.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dcd_megatron.loss import DCDConfig, DCDConfigError, dcd_weights, make_loss_func

B, S = 3, 11


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, S, generator=g) > 0.2).float()
    seg = torch.zeros(B, S, dtype=torch.long)
    seg[:, 6:] = 1  # two packed documents a row
    return {"s": -torch.rand(B, S, generator=g) * 3, "a": -torch.rand(B, S, generator=g) * 3,
            "ref": -torch.rand(B, S, generator=g) * 3, "mask": mask, "seg": seg}


def _loop_trajectory(s, a, mask, seg, cfg):
    """The definition, token by token: u_t times the product of the earlier response tokens' fork factors."""
    g = torch.exp(cfg.gate_power * a) if cfg.method == "gated" else torch.zeros_like(a)
    sig = torch.sigmoid(((s - a).clamp(-cfg.clip, cfg.clip) - cfg.bias) / cfg.tau)
    u, fork = g + (1 - g) * sig, g + (1 - g) * torch.clamp(2 * sig, max=1.0)
    out = torch.zeros_like(u)
    for i in range(s.shape[0]):
        product, doc = 1.0, None
        for t in range(s.shape[1]):
            if seg[i, t] != doc:
                product, doc = 1.0, seg[i, t]
            if mask[i, t] > 0:
                out[i, t] = u[i, t] * product
                product *= float(fork[i, t])
    return out.clamp(cfg.floor, cfg.cap) * mask


@pytest.mark.parametrize("cfg", [DCDConfig(method="gated", gate_power=2.0, trajectory=True),
                                 DCDConfig(method="sigmoid", tau=0.7, bias=0.3, trajectory=True)],
                         ids=["gated", "sigmoid"])
def test_trajectory_is_the_product_of_earlier_fork_factors_reset_per_document(cfg):
    d = _data()
    got = dcd_weights(d["s"], d["a"], d["mask"], cfg, segment_ids=d["seg"])
    torch.testing.assert_close(got, _loop_trajectory(d["s"], d["a"], d["mask"], d["seg"], cfg), rtol=1e-6, atol=1e-7)


def test_trajectory_costs_nothing_where_the_student_agrees_or_the_teacher_is_sure():
    d = _data(1)
    plain, traj = DCDConfig(method="gated"), DCDConfig(method="gated", trajectory=True)
    agree = d["a"] + torch.rand(B, S)  # l >= 0 everywhere: every fork factor is 1, no length bias
    torch.testing.assert_close(dcd_weights(agree, d["a"], d["mask"], traj), dcd_weights(agree, d["a"], d["mask"], plain))
    sure = torch.zeros(B, S)  # p_teacher = 1: the gate is 1, so is every factor, whatever the student says
    torch.testing.assert_close(dcd_weights(d["s"], sure, d["mask"], traj), dcd_weights(d["s"], sure, d["mask"], plain))
    # a rejected fork (l << 0, teacher unsure) discounts the rest of its document, and only that document
    s, a = torch.zeros(1, 8), torch.full((1, 8), -0.01)
    s[0, 2], a[0, 2] = -8.0, -1.0
    seg = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
    w = dcd_weights(s, a, torch.ones(1, 8), traj, segment_ids=seg)
    assert torch.all(w[0, 3:5] < 1e-3) and torch.all(w[0, :2] > 0.5) and torch.all(w[0, 5:] > 0.5)


def test_reference_weights_read_the_initial_student_not_the_live_one():
    d = _data(2)
    for method in ("gated", "sigmoid", "tis", "sequence", "student_only"):
        ref_cfg = DCDConfig(method=method, reference="initial")
        got = dcd_weights(d["s"], d["a"], d["mask"], ref_cfg, segment_ids=d["seg"], reference_logprobs=d["ref"])
        want = dcd_weights(d["ref"], d["a"], d["mask"], DCDConfig(method=method), segment_ids=d["seg"])
        torch.testing.assert_close(got, want, msg=method)
        other = dcd_weights(d["s"] - 1.0, d["a"], d["mask"], ref_cfg, segment_ids=d["seg"], reference_logprobs=d["ref"])
        torch.testing.assert_close(other, got, msg=method)  # the live student does not move them
    # sft reads no student: the reference is neither needed nor read
    sft = DCDConfig(method="sft", reference="initial")
    assert not sft.needs_reference
    torch.testing.assert_close(dcd_weights(d["s"], None, d["mask"], sft), d["mask"])


def test_reference_gradient_is_the_weighted_sft_gradient_and_chunked_is_fused(monkeypatch):
    from dcd_megatron.loss import chunked

    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(2, 9, 8, generator=g), torch.randn(17, 8, generator=g)
    batch = {"labels": torch.randint(0, 17, (2, 9), generator=g), "loss_mask": torch.ones(2, 9),
             "teacher_logprobs": -torch.rand(2, 9, generator=g) * 3, "student_ref_logprobs": -torch.rand(2, 9, generator=g) * 3,
             "segment_ids": torch.zeros(2, 9, dtype=torch.long)}
    cfg = DCDConfig(method="gated", reference="initial", trajectory=True, normalize="none", chunk_size=4)
    u = dcd_weights(batch["student_ref_logprobs"], batch["teacher_logprobs"], batch["loss_mask"],
                    dataclasses.replace(cfg, reference="live"), segment_ids=batch["segment_ids"])
    h = hidden.clone().requires_grad_()
    logp = torch.log_softmax(F.linear(h, weight), -1).gather(-1, batch["labels"][..., None]).squeeze(-1)
    (-(u * logp).sum()).backward()
    # along-row weights from the batch alone take the fused scheme: the recompute path is never called
    monkeypatch.setattr(chunked, "chunked_logprobs", lambda *a, **k: pytest.fail("recompute scheme used"))
    h2 = hidden.clone().requires_grad_()
    loss, _, _ = make_loss_func(cfg)(batch, h2, output_weight=weight)
    loss.backward()
    torch.testing.assert_close(loss, -(u * logp).sum().detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h.grad, rtol=1e-5, atol=1e-6)


def test_clear_errors():
    d = _data(4)
    tis = DCDConfig(method="tis", trajectory=True)  # no fork factor: the discount is not applied
    assert not tis.uses_trajectory
    torch.testing.assert_close(dcd_weights(d["s"], d["a"], d["mask"], tis),
                               dcd_weights(d["s"], d["a"], d["mask"], DCDConfig(method="tis")))
    with pytest.raises(DCDConfigError, match="trajectory: expected true or false"):
        DCDConfig(trajectory="yes")
    with pytest.raises(DCDConfigError, match="reference: 'frozen' is not one of"):
        DCDConfig(reference="frozen")
    cfg = DCDConfig(reference="initial")
    with pytest.raises(ValueError, match="needs the initial student's log-probs .*dcd-score --reference"):
        dcd_weights(d["s"], d["a"], d["mask"], cfg)
    holes = d["ref"].clone()
    holes[d["mask"] > 0] = float("nan")
    with pytest.raises(ValueError, match=r"student_ref_logprobs has \d+ NaN/inf value\(s\) on loss-masked-in"):
        dcd_weights(d["s"], d["a"], d["mask"], cfg, reference_logprobs=holes)
    from dcd_megatron.configs.train import TrainConfig

    with pytest.raises(ValueError, match="loss.reference=initial .* model.init_checkpoint is not set"):
        TrainConfig(loss=cfg)


def test_live_trajectory_is_fused_chunk_by_chunk_in_token_order(monkeypatch):
    """Without context parallelism the trajectory (fixed bias, token gate) needs no recompute: each chunk's
    weights follow from its own log-probs and the carried product; chunk boundaries inside documents."""
    from dcd_megatron.loss import chunked

    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(2, 13, 8, generator=g), torch.randn(19, 8, generator=g)
    seg = torch.zeros(2, 13, dtype=torch.long)
    seg[:, 5:] = 1
    seg[1, 9:] = 2
    batch = {"labels": torch.randint(0, 19, (2, 13), generator=g), "loss_mask": (torch.rand(2, 13, generator=g) > 0.2).float(),
             "teacher_logprobs": -torch.rand(2, 13, generator=g) * 2, "segment_ids": seg}
    for cfg in (DCDConfig(method="gated", gate_power=2.0, trajectory=True, normalize="none"),
                DCDConfig(method="sigmoid", bias=0.2, trajectory=True, floor=0.01, normalize="micro")):
        want = make_loss_func(dataclasses.replace(cfg, chunk_size=0))
        h1 = hidden.clone().requires_grad_()
        loss1, _, _ = want(batch, F.linear(h1, weight))
        loss1.backward()
        for chunk in (1, 3, 7):
            with monkeypatch.context() as m:
                m.setattr(chunked, "chunked_logprobs", lambda *a, **k: pytest.fail("recompute scheme used"))
                h2 = hidden.clone().requires_grad_()
                loss2, _, _ = make_loss_func(dataclasses.replace(cfg, chunk_size=chunk))(batch, h2, output_weight=weight)
                loss2.backward()
            torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)


def test_auto_reference_follows_the_traces_and_says_so(capsys, tmp_path):
    """loss.reference=auto: the initial student's log-probs when the traces carry them, else the live
    student, said in one line; a partial column or no init checkpoint is one clear error."""
    from types import SimpleNamespace

    from dcd_megatron.configs.train import TrainConfig
    from dcd_megatron.data import DataConfigError
    from dcd_megatron.model.config import ModelConfig
    from dcd_megatron.train.setup import _checked_loss

    def run(init, **loss):
        cfg = TrainConfig(loss=DCDConfig(reference="auto", **loss), model=ModelConfig(init_checkpoint=init))
        return SimpleNamespace(cfg=cfg, is_logger=True)

    meta = {"has_teacher_logprobs_fraction": 1.0}
    live = _checked_loss(run(None), {**meta, "has_student_ref_logprobs_fraction": 0.0})
    assert live.reference == "live" and not live.trajectory
    assert "the weights read the live student, without the trajectory discount" in capsys.readouterr().out
    ref = _checked_loss(run(str(tmp_path)), {**meta, "has_student_ref_logprobs_fraction": 1.0})
    assert ref.reference == "initial" and ref.needs_reference and "initial student's" in capsys.readouterr().out
    with pytest.raises(DataConfigError, match="only 50.0% of the kept training rows"):
        _checked_loss(run(str(tmp_path)), {**meta, "has_student_ref_logprobs_fraction": 0.5})
    with pytest.raises(DataConfigError, match="model.init_checkpoint is not set"):
        _checked_loss(run(None), {**meta, "has_student_ref_logprobs_fraction": 1.0})
    assert _checked_loss(run(None, method="sft"), {"has_student_ref_logprobs_fraction": 0.0}).reference == "live"
    assert capsys.readouterr().out == ""  # sft reads no student: nothing to say
