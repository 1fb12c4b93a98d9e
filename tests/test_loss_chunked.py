"""The chunked (memory-bounded) DCD loss equals the full-logits loss: values and gradients.

Single-process checks against ``F.linear`` + the unchunked loss function (every method,
both gradient schemes, fp32/bf16, packed documents, chunk sizes that do not divide the
token count); one 4-rank gloo launch for TP=2 x CP=2 with a padded vocabulary against the
whole batch in one process; and one real megatron-core TP=2 x PP=2 step of a tiny
``GPTModel`` with tied embeddings, chunked on vs off.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dcd_megatron.loss import DCDConfig, DCDConfigError, make_loss_func, vocab_parallel_logprobs
from dcd_megatron.loss.chunked import chunked_logprobs, fused_chunked_loss
from dcd_megatron.loss.cp_layout import split_for_rank
from tests.dist import run_ranks

B, S, H, V = 2, 13, 16, 37
CONFIGS = {
    "sft": DCDConfig(method="sft"),
    "sigmoid": DCDConfig(method="sigmoid", tau=0.7),
    "student_only": DCDConfig(method="student_only", student_only_form="power"),
    "tis": DCDConfig(method="tis", floor=0.05),
    "prefix": DCDConfig(method="prefix", prefix_transform="sigmoid"),
    "prefix_window": DCDConfig(method="prefix", prefix_window=3),
    "sequence": DCDConfig(method="sequence"),
    "sigmoid_median": DCDConfig(method="sigmoid", bias_mode="median"),
    "gated": DCDConfig(method="gated", gate_power=4.0, tau=0.5),
    "gated_entropy": DCDConfig(method="gated", gate="entropy", gate_power=2.0, floor=0.05),
    "gated_median": DCDConfig(method="gated", gate="entropy", bias_mode="median", cap=0.9),
    "gated_trajectory": DCDConfig(method="gated", gate_power=4.0, tau=0.5, trajectory=True),
    # the weights come from the batch alone: fused even though the trajectory looks along the row
    "gated_reference_trajectory": DCDConfig(method="gated", gate_power=4.0, tau=0.5, trajectory=True,
                                            reference="initial"),
    "sequence_reference": DCDConfig(method="sequence", reference="initial"),
}
K = 4  # teacher top-k entries per token (read by the entropy gate)


def make_batch(seed=0, b=B, s=S, vocab=V, h=H, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(b, s, dtype=torch.long)
    seg[:, s // 2 + 1 :] = 1  # two packed documents per row
    mask = (torch.rand(b, s, generator=g) > 0.25).float()
    mask[:, 0] = 0
    batch = {
        "labels": torch.randint(0, vocab, (b, s), generator=g),
        "loss_mask": mask,
        "teacher_logprobs": -torch.rand(b, s, generator=g) * 4,
        "segment_ids": seg,
    }
    hidden = torch.randn(b, s, h, generator=g).to(dtype)
    weight = (torch.randn(vocab, h, generator=g) * 0.5).to(dtype)
    topk = torch.log_softmax(torch.randn(b, s, vocab, generator=g) * 3, -1).topk(K, dim=-1).values
    topk[:, 0] = float("nan")  # masked-out: no top-k
    batch["teacher_topk_logprobs"] = topk
    batch["student_ref_logprobs"] = -torch.rand(b, s, generator=g) * 4  # the frozen initial student's
    return batch, hidden, weight


def _run(cfg, batch, hidden, weight, chunked, scale=1.0):
    fn = make_loss_func(cfg)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    if chunked:
        loss, n, report = fn(batch, h, output_weight=w)
    else:
        loss, n, report = fn(batch, F.linear(h, w))
    (loss * scale).backward()
    return loss.detach(), n, report, h.grad, w.grad


@pytest.mark.parametrize("normalize", ["global", "micro"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_equals_full_logits(name, dtype, normalize):
    cfg = dataclasses.replace(CONFIGS[name], normalize=normalize, chunk_size=5)  # 5 does not divide 19ish
    batch, hidden, weight = make_batch(dtype=dtype)
    want = _run(cfg, batch, hidden, weight, chunked=False, scale=0.5)
    got = _run(cfg, batch, hidden, weight, chunked=True, scale=0.5)
    # bf16: both paths make the same bf16 logits; the gradients differ by bf16 rounding
    # of the matmul outputs and by fp32 accumulation of the weight gradient over chunks
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[0], want[0], **tol)
    assert int(got[1]) == int(want[1])
    for key in want[2]:
        torch.testing.assert_close(got[2][key], want[2][key], **tol, msg=key)
    assert got[3].dtype == dtype and got[4].dtype == dtype
    torch.testing.assert_close(got[3].float(), want[3].float(), **tol)
    torch.testing.assert_close(got[4].float(), want[4].float(), **tol)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_logprobs_match_vocab_parallel_logprobs(chunk):
    batch, hidden, weight = make_batch(seed=1)
    grad_out = torch.randn(B, S)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = vocab_parallel_logprobs(F.linear(h1, w1), batch["labels"])
    ref.backward(grad_out)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = chunked_logprobs(h2, w2, batch["labels"], chunk_size=chunk)
    got.backward(grad_out)
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-6)

    # masked rows: value 0 and no gradient
    valid = batch["loss_mask"] > 0
    h3 = hidden.clone().requires_grad_()
    part = chunked_logprobs(h3, weight, batch["labels"], chunk_size=chunk, mask=valid)
    part.backward(grad_out)
    torch.testing.assert_close(part, torch.where(valid, ref.detach(), 0.0), rtol=1e-6, atol=1e-6)
    assert torch.all(h3.grad[~valid] == 0)


def test_fused_scales_with_the_upstream_gradient_and_matches_recompute():
    batch, hidden, weight = make_batch(seed=2)

    def chunk_loss(logprobs, rows):  # a per-token, s-dependent coefficient times s
        coef = -torch.sigmoid(logprobs)
        return (coef * logprobs).sum(), coef

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, s = fused_chunked_loss(h1, w1, batch["labels"], chunk_loss, chunk_size=3)
    (loss * 3.0).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    s2 = chunked_logprobs(h2, w2, batch["labels"], chunk_size=7)
    ref = (-torch.sigmoid(s2.detach()) * s2).sum()
    (ref * 3.0).backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, s2.detach())
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_evaluation_and_single_chunk():
    batch, hidden, weight = make_batch(seed=3)
    full = make_loss_func(DCDConfig(chunk_size=0))(batch, F.linear(hidden, weight))
    with torch.no_grad():
        evaluated = make_loss_func(DCDConfig(chunk_size=4))(batch, hidden, output_weight=weight)
    one_chunk = make_loss_func(DCDConfig(chunk_size=0))(batch, hidden, output_weight=weight)
    for got in (evaluated, one_chunk):
        torch.testing.assert_close(got[0].detach(), full[0].detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[2]["ce"], full[2]["ce"])


def test_config_and_bad_inputs():
    assert DCDConfig().chunked and DCDConfig().chunk_size > 0  # on by default
    assert not DCDConfig(chunk_size=0).chunked
    assert DCDConfig(term="topk_kl").chunked and not DCDConfig(term="topk_kl", chunk_size=0).chunked
    for bad in (-1, 1.5, True):
        with pytest.raises(DCDConfigError, match="chunk_size"):
            DCDConfig(chunk_size=bad)
    batch, hidden, weight = make_batch()
    with pytest.raises(ValueError, match="do not match"):
        make_loss_func(DCDConfig())(batch, hidden, output_weight=weight[:, :-1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make_loss_func(DCDConfig())({**batch, "labels": batch["labels"] + V}, hidden, output_weight=weight)


# ----------------------------------------------------------------------------- 4 gloo ranks
REAL_VOCAB, SHARD = 53, 28  # padded to 56 = 2 x 28; labels stay below 53
DIST_CONFIGS = {
    "sft": DCDConfig(method="sft", normalize="micro", chunk_size=3),
    "sigmoid": DCDConfig(method="sigmoid", normalize="micro", chunk_size=3),
    "prefix": DCDConfig(method="prefix", normalize="micro", chunk_size=3),
    "sequence": DCDConfig(method="sequence", normalize="micro", chunk_size=3),
    "sigmoid_bf16": DCDConfig(method="sigmoid", normalize="micro", chunk_size=5),
    "gated": DCDConfig(method="gated", gate_power=4.0, normalize="micro", chunk_size=3),
    "gated_entropy_median": DCDConfig(method="gated", gate="entropy", bias_mode="median", chunk_size=3),
    "gated_bf16": DCDConfig(method="gated", gate="entropy", normalize="micro", chunk_size=5),
    "gated_trajectory": DCDConfig(method="gated", gate_power=4.0, trajectory=True, normalize="micro", chunk_size=3),
    "gated_reference_trajectory": DCDConfig(method="gated", gate_power=4.0, trajectory=True, reference="initial",
                                            chunk_size=3),
}
DIST_S = 16  # CP=2, load-balanced: 4 chunks of 4 positions


def dist_data(name):
    dtype = torch.bfloat16 if name.endswith("bf16") else torch.float32
    batch, hidden, weight = make_batch(seed=20, s=DIST_S, vocab=2 * SHARD, dtype=dtype)
    batch["labels"] = batch["labels"] % REAL_VOCAB
    return batch, hidden, weight


def _loss_part(rank):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    from dcd_megatron.model.builder import _ContiguousGrad

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2, context_parallel_size=2)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    cp_group = parallel_state.get_context_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    cp_rank = parallel_state.get_context_parallel_rank()
    positions = split_for_rank(torch.arange(DIST_S), cp_rank, 2)
    out = {"tp_rank": tp_rank, "cp_rank": cp_rank}
    for name, cfg in DIST_CONFIGS.items():
        batch, hidden, weight = dist_data(name)
        local = {k: v[:, positions] for k, v in batch.items()}
        h = hidden[:, positions].transpose(0, 1).clone().requires_grad_()  # megatron's [s, b, h]
        w = weight[tp_rank * SHARD : (tp_rank + 1) * SHARD].clone().requires_grad_()
        fn = make_loss_func(cfg, tp_group=tp_group, cp_group=cp_group)
        # what the model's output layer does with TP > 1 (gradient all-reduced over TP), then
        # GPTModel's [s, b] -> [b, s] transpose
        x = _ContiguousGrad.apply(copy_to_tensor_model_parallel_region(h, group=tp_group)).transpose(0, 1)
        loss, n, report = fn(local, x.contiguous(), output_weight=w)
        loss.backward()
        out[name] = {"loss": loss.detach(), "h": h.grad.transpose(0, 1), "w": w.grad, "ce": report["ce"]}
    parallel_state.destroy_model_parallel()
    return out


# ----------------------------------------------------------------------------- GPTModel step
GPT_VOCAB, GPT_SEQ, GPT_ROWS, GPT_MICRO = 64, 16, 2, 2


def _gpt_part(rank):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dcd_megatron.loss import rescale_grads_for_global_weight_mean
    from dcd_megatron.model.builder import return_hidden_states
    from dcd_megatron.train.step import make_forward_step
    from tests.test_loss_tp_pp import _transformer_config

    parallel_state.initialize_model_parallel(2, 2)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    config = _transformer_config(2, 2)
    config.finalize_model_grads_func = finalize_model_grads
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=GPT_VOCAB, max_sequence_length=GPT_SEQ, pre_process=pp_rank == 0, post_process=pp_rank == 1,
        share_embeddings_and_output_weights=True, position_embedding_type="rope",
    )
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    batches = []
    g = torch.Generator().manual_seed(4)
    for _ in range(GPT_MICRO):
        batch, _, _ = make_batch(seed=int(torch.randint(0, 1000, (1,), generator=g)), b=GPT_ROWS, s=GPT_SEQ,
                                 vocab=GPT_VOCAB)
        batch["tokens"] = torch.randint(0, GPT_VOCAB, (GPT_ROWS, GPT_SEQ), generator=g)
        batch["position_ids"] = torch.arange(GPT_SEQ).expand(GPT_ROWS, GPT_SEQ)
        batches.append(batch)
    cfg = DCDConfig(method="prefix", chunk_size=5)  # normalize="global": the rescale after the step
    out = {"pp_rank": pp_rank}
    for chunked in (False, True):
        if chunked:
            return_hidden_states(model)
        loss_fn = make_loss_func(cfg, tp_group=parallel_state.get_tensor_model_parallel_group())
        step = make_forward_step(loss_fn, packed=False, use_te=False, device=torch.device("cpu"), hidden_states=chunked)
        ddp.zero_grad_buffer()
        reports = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=[ddp],
            num_microbatches=GPT_MICRO, seq_length=GPT_SEQ, micro_batch_size=GPT_ROWS,
        )
        factor = rescale_grads_for_global_weight_mean(
            [ddp], reports, pp_group=parallel_state.get_pipeline_model_parallel_group(),
            dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )
        out[chunked] = {
            "factor": factor,
            "loss": [float(r["loss"][0]) for r in reports],
            "grads": {n: p.main_grad.clone() for n, p in ddp.named_parameters()},
        }
    parallel_state.destroy_model_parallel()
    return out


def _rank_main(rank, world_size):
    return {"loss": _loss_part(rank), "gpt": _gpt_part(rank)}


@pytest.fixture(scope="module")
def dist_results():
    return run_ranks(_rank_main, 4, timeout=840)


@pytest.mark.megatron
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(DIST_CONFIGS))
def test_tp2_cp2_padded_vocab_matches_single_process(dist_results, name):
    cfg = DIST_CONFIGS[name]
    batch, hidden, weight = dist_data(name)
    ref = _run(dataclasses.replace(cfg, chunk_size=0), batch, hidden, weight, chunked=False)
    tol = dict(rtol=1e-5, atol=1e-5) if "bf16" not in name else dict(rtol=2e-2, atol=2e-2)
    parts = [r["loss"] for r in dist_results]
    for tp_rank in (0, 1):
        mine = [p for p in parts if p["tp_rank"] == tp_rank]
        # the CP ranks' loss sums add up to the micro-batch's
        torch.testing.assert_close(sum(p[name]["loss"] for p in mine), ref[0], **tol)
        w_grad = sum(p[name]["w"].float() for p in mine)  # DP x CP gradient all-reduce
        torch.testing.assert_close(w_grad, ref[4][tp_rank * SHARD : (tp_rank + 1) * SHARD].float(), **tol)
        for p in mine:
            positions = split_for_rank(torch.arange(DIST_S), p["cp_rank"], 2)
            torch.testing.assert_close(p[name]["h"].float(), ref[3][:, positions].float(), **tol)
    assert torch.all(ref[4][REAL_VOCAB:] != 0)  # padded rows take part in the softmax, as in megatron


@pytest.mark.megatron
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpt_tp2_pp2_tied_step_chunked_equals_full_logits(dist_results):
    for r in dist_results:
        got = r["gpt"]
        assert got[True]["factor"] == pytest.approx(got[False]["factor"], rel=1e-6)
        assert got[True]["loss"] == pytest.approx(got[False]["loss"], rel=1e-6)
        if got["pp_rank"] == 1:
            assert got[True]["loss"], "the last stage computed the loss"
        assert set(got[True]["grads"]) == set(got[False]["grads"])
        for name, want in got[False]["grads"].items():
            scale = float(want.abs().max()) or 1.0
            torch.testing.assert_close(got[True]["grads"][name], want, rtol=1e-5, atol=1e-6 * scale, msg=name)
