"""One real TP=2 x PP=2 megatron-core step of a tiny GPTModel with the DCD loss equals TP=1, PP=1.

Four gloo ranks first build the full model (local spec, RMSNorm, SwiGLU, RoPE, GQA) and
compute the reference: the whole global batch in one forward/backward, weights made mean-1
over it. Then they build the same model sharded TP=2 x PP=2 with those weights, run
``forward_backward_func`` over several micro-batches with DDP and
``rescale_grads_for_global_weight_mean``, and return their gradient shards; once per loss
config (``prefix`` weights, which look along the sequence, and the per-token ``gated`` weights).
"""

import dataclasses
import functools

import pytest
import torch

from dcd_megatron.loss import DCDConfig, make_loss_func
from tests.dist import run_ranks

pytestmark = [pytest.mark.megatron, pytest.mark.slow, pytest.mark.timeout(900)]

VOCAB, SEQ, MICRO_ROWS, MICRO = 64, 16, 2, 3
LAYERS, HIDDEN, HEADS, GROUPS, FFN = 2, 32, 4, 2, 48
CONFIGS = {  # normalize="global": the rescale after the step
    "prefix": DCDConfig(method="prefix", prefix_transform="sigmoid", tau=0.5),
    "gated": DCDConfig(method="gated", gate_power=4.0, tau=0.5),
}


def micro_batches():
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(MICRO):
        seg = torch.zeros(MICRO_ROWS, SEQ, dtype=torch.long)
        seg[:, SEQ // 2 + 1 :] = 1  # two packed documents per row
        mask = torch.ones(MICRO_ROWS, SEQ)
        mask[:, :3] = 0
        mask[:, SEQ // 2 + 1 : SEQ // 2 + 3] = 0
        out.append({
            "tokens": torch.randint(0, VOCAB, (MICRO_ROWS, SEQ), generator=g),
            "labels": torch.randint(0, VOCAB, (MICRO_ROWS, SEQ), generator=g),
            "loss_mask": mask,
            "teacher_logprobs": -torch.rand(MICRO_ROWS, SEQ, generator=g) * 6,
            "segment_ids": seg,
        })
    return out


def _transformer_config(tp, pp):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_query_groups=GROUPS,
        ffn_hidden_size=FFN, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.2,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, use_cpu_initialization=True,
        pipeline_dtype=torch.float32, batch_p2p_sync=False, calculate_per_token_loss=True,
    )


def _gpt(config, pre_process=True, post_process=True):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=False, position_embedding_type="rope",
    )


def _positions(batch):
    return torch.arange(SEQ).expand(batch["tokens"].shape[0], SEQ)


def shard(full: torch.Tensor, name: str, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's slice of a full-model tensor (megatron's partition dims; SwiGLU fc1 halves)."""
    if name.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
        return full.chunk(tp, dim=0)[tp_rank]
    if name.endswith("linear_fc1.weight"):  # [gate; up]: each rank holds its part of both
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp, dim=1)[tp_rank]
    return full  # norms: replicated


def full_name(local_name: str, pp_rank: int) -> str:
    """The full model's parameter name of a pipeline stage's parameter."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + pp_rank * LAYERS // 2)
    return ".".join(parts)


def _rank_main(rank, world_size):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from dcd_megatron.loss import rescale_grads_for_global_weight_mean, reduce_reports

    batches = micro_batches()

    # Reference: TP=1, PP=1, the whole global batch at once (each rank computes the same).
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    full = _gpt(_transformer_config(1, 1))
    whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    reference = {"state": {k: v.detach().clone() for k, v in full.named_parameters()}}
    for name, cfg in CONFIGS.items():
        full.zero_grad(set_to_none=True)
        logits = full(input_ids=whole["tokens"], position_ids=_positions(whole), attention_mask=None)
        loss_sum, n, _ = make_loss_func(dataclasses.replace(cfg, normalize="micro"))(whole, logits)
        (loss_sum / n).backward()
        reference[name] = {"grads": {k: v.grad.clone() for k, v in full.named_parameters()}, "loss": float(loss_sum / n)}
    parallel_state.destroy_model_parallel()

    # TP=2 x PP=2 through megatron's pipeline schedule.
    parallel_state.initialize_model_parallel(2, 2)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    config = _transformer_config(2, 2)
    config.finalize_model_grads_func = finalize_model_grads
    model = _gpt(config, pre_process=pp_rank == 0, post_process=pp_rank == 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shard(reference["state"][full_name(name, pp_rank)], name, tp_rank, 2))
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    result = {"tp_rank": tp_rank, "pp_rank": pp_rank}
    for name, cfg in CONFIGS.items():
        loss_fn = make_loss_func(cfg, tp_group=parallel_state.get_tensor_model_parallel_group())

        def forward_step(data_iterator, m, loss_fn=loss_fn):
            batch = next(data_iterator)
            out = m(input_ids=batch["tokens"], position_ids=_positions(batch), attention_mask=None)
            return out, functools.partial(loss_fn, batch)

        ddp.zero_grad_buffer()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=[ddp],
            num_microbatches=MICRO, seq_length=SEQ, micro_batch_size=MICRO_ROWS,
        )
        factor = rescale_grads_for_global_weight_mean(
            [ddp], reports, pp_group=parallel_state.get_pipeline_model_parallel_group(), dp_cp_group=dp_cp
        )
        grads = {n.removeprefix("module."): p.main_grad.clone() for n, p in ddp.named_parameters()}
        result[name] = {"factor": factor, "grads": grads, "metrics": reduce_reports(reports, dp_cp)}
    parallel_state.destroy_model_parallel()
    return {"reference": reference if rank == 0 else None, "sharded": result}


@pytest.fixture(scope="module")
def results():
    return run_ranks(_rank_main, 4, timeout=840)


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_tp2_pp2_step_matches_single_process(results, config_name):
    reference = {"state": results[0]["reference"]["state"], **results[0]["reference"][config_name]}
    seen = set()
    for r in results:
        tp_rank, pp_rank = r["sharded"]["tp_rank"], r["sharded"]["pp_rank"]
        got = r["sharded"][config_name]
        assert got["factor"] > 1.0  # sigmoid weights are < 1: the rescale did something
        if pp_rank == 1:  # the last stage reports the loss: weighted CE with weights mean-1 globally
            assert got["metrics"]["weighted_ce_normalized"] == pytest.approx(reference["loss"], rel=1e-5)
            assert got["metrics"]["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        else:
            assert got["metrics"] == {}
        for name, grad in got["grads"].items():
            fname = full_name(name, pp_rank)
            seen.add(fname)
            want = shard(reference["grads"][fname], name, tp_rank, 2)
            scale = float(want.abs().max())
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5 * scale, msg=f"{fname} (tp {tp_rank}, pp {pp_rank})")
    assert seen == set(reference["grads"]), "every parameter of the full model was compared"
