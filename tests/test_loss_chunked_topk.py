"""The chunked (memory-bounded) top-k KL term equals the full-logits top-k KL term: values, reports
and gradients.

Single process against ``F.linear`` + the unchunked loss function with ``term="topk_kl"``: every
method (both gradient schemes), fp32/bf16, micro/global/none normalisation, packed documents,
chunk sizes that do not divide the token count, a padded vocabulary (53 real ids of 56), labels
that are also top-k ids, a token whose top-k hold all the teacher's mass, and masked-out tokens
without a teacher top-k. One 2-rank gloo launch: TP=2 against the whole vocabulary in one process,
with top-k ids of one token on both shards.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from dcd_megatron.loss import METHODS, DCDConfig, make_loss_func
from tests.dist import run_ranks
from tests.test_loss_chunked import CONFIGS, H, S, _run, make_batch

B, K = 2, 4
REAL_VOCAB, SHARD = 53, 28  # the weight has 56 = 2 x 28 rows (padding); every id is below 53


def make_topk_batch(seed=0, b=B, s=S, k=K, dtype=torch.float32):
    """``make_batch`` with a teacher distribution over the real vocabulary and its top-k entries."""
    batch, hidden, weight = make_batch(seed=seed, b=b, s=s, vocab=2 * SHARD, h=H, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1000)
    teacher = torch.log_softmax(torch.randn(b, s, REAL_VOCAB, generator=g) * 2, dim=-1)
    ids = torch.stack([torch.randperm(REAL_VOCAB, generator=g)[:k] for _ in range(b * s)]).view(b, s, k)
    labels = batch["labels"] % REAL_VOCAB
    labels = torch.where(torch.rand(b, s, generator=g) < 0.5, ids[..., 0], labels)  # often a top-k id too
    topk = teacher.gather(-1, ids)
    topk[0, 3] = math.log(1.0 / k)  # this token's top-k hold all the teacher's mass: residual 0
    ids[:, 0], topk[:, 0] = -1, float("nan")  # masked-out (make_batch masks position 0): no top-k
    batch.update(labels=labels, teacher_logprobs=teacher.gather(-1, labels[..., None]).squeeze(-1),
                 teacher_topk_ids=ids, teacher_topk_logprobs=topk)
    return batch, hidden, weight


def _compare(got, want, tol):
    torch.testing.assert_close(got[0], want[0], **tol)
    assert int(got[1]) == int(want[1])
    assert set(got[2]) == set(want[2])
    for key in want[2]:
        torch.testing.assert_close(got[2][key], want[2][key], **tol, msg=key)
    for a, b in ((got[3], want[3]), (got[4], want[4])):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), **tol)


FP32 = dict(rtol=1e-5, atol=1e-5)
# bf16: both paths make the same bf16 logits; the gradients differ by bf16 rounding of the
# matmul outputs and by fp32 accumulation of the weight gradient over chunks
BF16 = dict(rtol=2e-2, atol=2e-2)


def test_the_configs_cover_every_method():
    assert {cfg.method for cfg in CONFIGS.values()} == set(METHODS)


@pytest.mark.parametrize("normalize", ["global", "micro", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_topk_kl_equals_full_logits(name, dtype, normalize):
    cfg = dataclasses.replace(CONFIGS[name], term="topk_kl", normalize=normalize, chunk_size=7)
    assert cfg.chunked
    batch, hidden, weight = make_topk_batch(dtype=dtype)
    assert int((batch["loss_mask"] > 0).sum()) % 7  # 7 does not divide the trained tokens (20)
    want = _run(cfg, batch, hidden, weight, chunked=False, scale=0.5)
    got = _run(cfg, batch, hidden, weight, chunked=True, scale=0.5)
    _compare(got, want, FP32 if dtype == torch.float32 else BF16)
    nll = _run(dataclasses.replace(cfg, term="nll"), batch, hidden, weight, chunked=True)
    assert abs(float(got[0]) - float(nll[0])) > 1e-2  # the KL term, not the default one
    assert torch.all(got[4][REAL_VOCAB:] != 0)  # padded rows take part in the softmax, as in megatron


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("name", ["sigmoid", "prefix"])  # fused and recompute schemes
def test_chunk_sizes(name, chunk):
    cfg = dataclasses.replace(CONFIGS[name], term="topk_kl", chunk_size=chunk)
    batch, hidden, weight = make_topk_batch(seed=5)
    _compare(_run(cfg, batch, hidden, weight, chunked=True), _run(cfg, batch, hidden, weight, chunked=False), FP32)


def test_no_grad_evaluation_equals_full_logits():
    cfg = DCDConfig(term="topk_kl", chunk_size=3)
    batch, hidden, weight = make_topk_batch(seed=6)
    full = make_loss_func(cfg)(batch, F.linear(hidden, weight))
    with torch.no_grad():
        got = make_loss_func(cfg)(batch, hidden, output_weight=weight)
    torch.testing.assert_close(got[0], full[0], **FP32)
    for key in full[2]:
        torch.testing.assert_close(got[2][key], full[2][key], **FP32, msg=key)


def test_missing_top_k_is_the_same_clear_error():
    batch, hidden, weight = make_topk_batch()
    fn = make_loss_func(DCDConfig(method="sft", term="topk_kl", chunk_size=4))
    trained = (batch["loss_mask"] > 0).nonzero()[0].tolist()
    broken = dict(batch, teacher_topk_logprobs=batch["teacher_topk_logprobs"].clone())
    broken["teacher_topk_logprobs"][trained[0], trained[1], 2] = float("nan")
    with pytest.raises(ValueError, match="1 trained token\\(s\\) have no teacher top-k"):
        fn(broken, hidden, output_weight=weight)
    with pytest.raises(ValueError, match="data.topk"):
        fn({k: v for k, v in batch.items() if k != "teacher_topk_ids"}, hidden, output_weight=weight)
    with pytest.raises(ValueError, match="must both be"):
        fn(dict(batch, teacher_topk_ids=batch["teacher_topk_ids"][:, :-1]), hidden, output_weight=weight)


def test_other_terms_are_refused_on_the_chunked_path():
    batch, hidden, weight = make_topk_batch()
    fn = make_loss_func(DCDConfig(chunk_size=4), token_term=lambda logits, batch, s: -s)
    with pytest.raises(ValueError, match="supports the nll and topk_kl terms"):
        fn(batch, hidden, output_weight=weight)


# ----------------------------------------------------------------------------- 2 gloo ranks
DIST_CONFIGS = {
    "sigmoid_micro": DCDConfig(method="sigmoid", term="topk_kl", normalize="micro", chunk_size=3),
    "tis": DCDConfig(method="tis", term="topk_kl", chunk_size=4),
    "prefix": DCDConfig(method="prefix", term="topk_kl", chunk_size=3),
    "sequence_micro": DCDConfig(method="sequence", term="topk_kl", normalize="micro", chunk_size=5),
    "sigmoid_bf16": DCDConfig(method="sigmoid", term="topk_kl", chunk_size=5),
    "gated_entropy": DCDConfig(method="gated", gate="entropy", term="topk_kl", chunk_size=4),
    "gated_micro": DCDConfig(method="gated", term="topk_kl", normalize="micro", chunk_size=3),
}
DIST_S = 16


def dist_data(name):
    return make_topk_batch(seed=20, s=DIST_S, dtype=torch.bfloat16 if name.endswith("bf16") else torch.float32)


def _tp_rank(rank, world_size):
    """This rank's vocabulary shard: loss, report, hidden-state gradient (all-reduced over TP, as the
    output layer does) and weight-shard gradient."""
    import torch.distributed as dist

    group = dist.new_group([0, 1])
    out = {}
    for name, cfg in DIST_CONFIGS.items():
        batch, hidden, weight = dist_data(name)
        h = hidden.clone().requires_grad_()
        w = weight[rank * SHARD : (rank + 1) * SHARD].clone().requires_grad_()
        loss, n, report = make_loss_func(cfg, tp_group=group)(batch, h, output_weight=w)
        loss.backward()
        dist.all_reduce(h.grad, group=group)
        out[name] = {"loss": loss.detach(), "n": int(n), "report": report, "h": h.grad, "w": w.grad}
    return out


@pytest.mark.megatron
@pytest.mark.timeout(900)
def test_tp2_matches_single_process():
    batch, _, _ = dist_data("tis")
    ids, valid = batch["teacher_topk_ids"], batch["loss_mask"] > 0
    both = (ids >= SHARD).any(-1) & (ids >= 0).all(-1) & ((ids >= 0) & (ids < SHARD)).any(-1)
    assert (both & valid).sum() >= 2  # trained tokens whose top-k ids lie on both shards
    results = run_ranks(_tp_rank, 2, timeout=840, patch=False)
    for name, cfg in DIST_CONFIGS.items():
        batch, hidden, weight = dist_data(name)
        ref = _run(dataclasses.replace(cfg, chunk_size=0), batch, hidden, weight, chunked=False)
        tol = BF16 if name.endswith("bf16") else FP32
        for rank, result in enumerate(results):
            got = result[name]
            torch.testing.assert_close(got["loss"], ref[0], **tol, msg=name)
            assert got["n"] == int(ref[1])
            for key in ref[2]:
                torch.testing.assert_close(got["report"][key], ref[2][key], **tol, msg=f"{name} {key}")
            torch.testing.assert_close(got["h"].float(), ref[3].float(), **tol, msg=name)
            shard = ref[4][rank * SHARD : (rank + 1) * SHARD]
            torch.testing.assert_close(got["w"].float(), shard.float(), **tol, msg=name)
