"""The top-k KL term: vocab-parallel gather of student log-probs (values and gradients at TP=1/2/4),
the KL with its residual bucket against full-vocabulary references, and the loss-function wiring."""

import pytest
import torch
import torch.nn.functional as F

from dcd_megatron.loss import DCDConfig, make_loss_func
from dcd_megatron.loss.topk_kl import TopKKLTerm, topk_kl, vocab_parallel_gather_logprobs
from tests.dist import run_ranks

V = 4 * 251  # divisible by TP=4, odd per shard


def _inputs(seed=0, b=2, s=5, v=V, k=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, s, v, generator=g) * 3).to(dtype)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * s)]).view(b, s, k)
    teacher = torch.log_softmax(torch.randn(b, s, v, generator=g) * 2, dim=-1)
    teacher_topk = teacher.gather(-1, ids)
    upstream = torch.randn(b, s, k, generator=g)
    return logits, ids, teacher_topk, upstream, teacher


def _reference_gather(logits, ids):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gather_matches_log_softmax_values_and_grads(dtype, tol):
    logits, ids, _, upstream, _ = _inputs(dtype=dtype)
    original = logits.clone()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    out = vocab_parallel_gather_logprobs(a, ids, chunk_elements=777)
    ref = _reference_gather(b, ids)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)
    assert torch.equal(logits, original)  # never written


def test_kl_over_the_whole_vocabulary_is_the_full_kl():
    logits, _, _, _, teacher = _inputs(k=V)
    ids = torch.arange(V).expand(2, 5, V)
    student = torch.log_softmax(logits, dim=-1)
    ours = topk_kl(teacher.gather(-1, ids), student.gather(-1, ids))
    full = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)


def test_kl_with_the_residual_bucket_matches_a_bucketed_reference():
    """Two distributions over V tokens, collapsed to k tokens + one bucket, computed plainly."""
    logits, ids, teacher_topk, _, teacher = _inputs(k=3)
    student = torch.log_softmax(logits, dim=-1)
    ours = topk_kl(teacher_topk, student.gather(-1, ids))
    mask = torch.zeros_like(teacher, dtype=torch.bool).scatter_(-1, ids, True)
    p_rest = teacher.exp().masked_fill(mask, 0).sum(-1)
    q_rest = student.exp().masked_fill(mask, 0).sum(-1)
    p_top, q_top = teacher.gather(-1, ids).exp(), student.gather(-1, ids).exp()
    ref = (p_top * (p_top.log() - q_top.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours >= -1e-6).all()


def test_kl_is_zero_with_zero_gradient_when_the_student_matches():
    logits, ids, _, _, _ = _inputs(k=5)
    x = logits.clone().requires_grad_()
    student = vocab_parallel_gather_logprobs(x, ids)
    kl = topk_kl(student.detach(), student)
    assert kl.abs().max() < 1e-5
    kl.sum().backward()
    assert x.grad.abs().max() < 1e-5


def _batch(ids, teacher_topk, b=2, s=5):
    mask = torch.ones(b, s)
    mask[0, 0] = 0
    return {
        "labels": ids[..., 0].clone(),
        "loss_mask": mask,
        "teacher_logprobs": teacher_topk[..., 0].clone(),
        "teacher_topk_ids": ids,
        "teacher_topk_logprobs": teacher_topk,
    }


def test_loss_function_weights_the_kl_term_and_reports():
    logits, ids, teacher_topk, _, _ = _inputs()
    batch = _batch(ids, teacher_topk)
    x = logits.clone().requires_grad_()
    loss_sum, n, report = make_loss_func(DCDConfig(method="sft", term="topk_kl"))(batch, x)
    kl = topk_kl(teacher_topk, _reference_gather(logits, ids))
    assert int(n) == 9
    torch.testing.assert_close(loss_sum, (kl * batch["loss_mask"]).sum(), atol=1e-5, rtol=1e-5)
    loss_sum.backward()
    assert x.grad[0, 0].abs().max() == 0  # masked position: no gradient
    assert torch.isfinite(report["weight"]).all()


def test_missing_top_k_is_a_clear_error():
    logits, ids, teacher_topk, _, _ = _inputs()
    batch = _batch(ids, teacher_topk)
    batch["teacher_topk_logprobs"] = teacher_topk.clone()
    batch["teacher_topk_logprobs"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="no teacher top-k"):
        make_loss_func(DCDConfig(method="sft", term="topk_kl"))(batch, logits)
    del batch["teacher_topk_ids"]
    with pytest.raises(ValueError, match="data.topk"):
        TopKKLTerm()(logits, batch, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="term"):
        DCDConfig(term="kl")


def _tp_check(rank, world_size):
    """Each TP size in one launch: the shard's gather/KL/gradient against the full-vocab reference."""
    import torch.distributed as dist

    results = {}
    for tp in (2, 4):
        if world_size % tp:
            continue
        group = dist.new_group(list(range(tp)))
        if rank >= tp:
            continue
        logits, ids, teacher_topk, _, _ = _inputs(seed=tp)
        shard = V // tp
        local = logits[..., rank * shard : (rank + 1) * shard].clone().requires_grad_()
        full = logits.clone().requires_grad_()
        batch = _batch(ids, teacher_topk)
        cfg = DCDConfig(method="sigmoid", term="topk_kl")
        ours, _, _ = make_loss_func(cfg, tp_group=group)(batch, local)
        ref, _, _ = make_loss_func(cfg)(batch, full)
        ours.backward()
        ref.backward()
        results[tp] = (
            float((ours - ref).abs()),
            float((local.grad - full.grad[..., rank * shard : (rank + 1) * shard]).abs().max()),
        )
    return results


@pytest.mark.megatron
def test_tensor_parallel_kl_matches_single_process():
    results = run_ranks(_tp_check, 4)
    assert set(results[0]) == {2, 4} and set(results[3]) == {4}
    for rank_result in results:
        for tp, (loss_err, grad_err) in rank_result.items():
            assert loss_err < 1e-4, (tp, loss_err)
            assert grad_err < 1e-5, (tp, grad_err)
