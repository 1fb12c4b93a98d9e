"""The DCD loss on 4 gloo ranks, against single-process references (one launch, several checks).

One spawn of 4 ranks runs, in order: vocab_parallel_logprobs at TP=1/2/4 (fp32, bf16);
a peer check against megatron-core's vocab_parallel_cross_entropy at TP=2; prefix /
sequence / median weights at CP=2 in both layouts; and a real megatron-core
forward_backward_func step at DP=2 x CP=2 with DDP, several micro-batches and
``rescale_grads_for_global_weight_mean``. The tests below each assert one part.
"""

import functools

import pytest
import torch

from dcd_megatron.loss import DCDConfig, dcd_weights, make_loss_func, normalize_weights
from dcd_megatron.loss.cp_layout import split_for_rank
from tests.dist import run_ranks

pytestmark = [pytest.mark.megatron, pytest.mark.timeout(900)]  # 4 ranks on a shared 2-core box

WORLD = 4
VOCAB = 4 * 251  # divisible by TP=4, odd per shard
SEQ, ROWS = 6, 3

CP_CONFIGS = {
    "prefix": DCDConfig(method="prefix"),
    "prefix_window": DCDConfig(method="prefix", prefix_window=3, prefix_transform="sigmoid", bias_mode="median"),
    "sequence": DCDConfig(method="sequence", normalize="micro"),
    "sigmoid_median": DCDConfig(method="sigmoid", bias_mode="median", normalize="micro"),
    "gated_median": DCDConfig(method="gated", gate_power=2.0, bias_mode="median", normalize="micro"),
    "gated_entropy_median": DCDConfig(method="gated", gate="entropy", bias_mode="median", tau=0.5),
    "gated_trajectory": DCDConfig(method="gated", gate_power=2.0, trajectory=True, normalize="micro"),
    "sigmoid_trajectory_median": DCDConfig(method="sigmoid", trajectory=True, bias_mode="median"),
    "gated_reference_trajectory": DCDConfig(method="gated", gate_power=2.0, reference="initial", trajectory=True),
}
GLOBAL_CONFIGS = {
    "sequence": DCDConfig(method="sequence"),
    "sigmoid": DCDConfig(tau=0.5),
    "gated": DCDConfig(method="gated", gate_power=4.0, tau=0.5),
    "gated_entropy": DCDConfig(method="gated", gate="entropy", gate_power=2.0),
    "gated_trajectory": DCDConfig(method="gated", gate_power=4.0, tau=0.5, trajectory=True),
    "gated_reference_trajectory": DCDConfig(method="gated", gate_power=4.0, tau=0.5, reference="initial",
                                            trajectory=True),
}
TOPK = 3  # teacher top-k entries per token (the entropy gate reads them)
DP, CP, MICRO, MICRO_ROWS, CP_SEQ, HIDDEN, SMALL_VOCAB = 2, 2, 3, 2, 16, 8, 13


# ----------------------------------------------------------------------------- data
def logits_data(dtype):
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(ROWS, SEQ, VOCAB, generator=g) * 3).to(dtype)
    targets = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    grad_out = torch.randn(ROWS, SEQ, generator=g)
    return logits, targets, grad_out


def lm_batch():
    g = torch.Generator().manual_seed(12)
    mask = (torch.rand(ROWS, SEQ, generator=g) > 0.3).float()
    return {
        "labels": torch.randint(0, VOCAB, (ROWS, SEQ), generator=g),
        "loss_mask": mask,
        "teacher_logprobs": -torch.rand(ROWS, SEQ, generator=g) * 5,
    }


def packed_rows(seed, rows, length, vocab):
    """Rows of packed documents: tokens, labels, mask (prompt 0 / response 1), teacher, segments."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.zeros(rows, length)
    for i in range(rows):
        t, doc = 0, 100 * i
        while t < length:
            n = int(torch.randint(3, 9, (1,), generator=g))
            prompt = int(torch.randint(1, 3, (1,), generator=g))
            seg[i, t : t + n] = doc
            mask[i, t + prompt : t + n] = 1
            t, doc = t + n, doc + 1
    return {
        "tokens": torch.randint(0, vocab, (rows, length), generator=g),
        "labels": torch.randint(0, vocab, (rows, length), generator=g),
        "loss_mask": mask,
        "teacher_logprobs": -torch.rand(rows, length, generator=g) * 4,
        "segment_ids": seg,
        "student_logprobs": -torch.rand(rows, length, generator=g) * 4,
        "teacher_topk_logprobs": _topk(seed, rows, length),
        "student_ref_logprobs": -torch.rand(rows, length, generator=g) * 4,  # the frozen initial student's
    }


def _topk(seed, rows, length):
    """Teacher top-k log-probs ``[rows, length, TOPK]`` of random distributions, some peaked."""
    g = torch.Generator().manual_seed(seed + 1000)
    sharpness = torch.rand(rows, length, 1, generator=g) * 4
    return torch.log_softmax(torch.randn(rows, length, 11, generator=g) * sharpness, -1).topk(TOPK, -1).values


def split(value, cp_rank, layout="load_balanced"):
    """This CP rank's positions of a ``[b, S]`` or ``[b, S, k]`` tensor."""
    if value.dim() == 3:
        return split_for_rank(value.transpose(1, 2), cp_rank, 2, layout).transpose(1, 2)
    return split_for_rank(value, cp_rank, 2, layout)


def global_batches():
    """DP x MICRO micro-batches of full-length rows, indexed [dp_rank][micro]."""
    return [[packed_rows(100 + d * MICRO + k, MICRO_ROWS, CP_SEQ, SMALL_VOCAB) for k in range(MICRO)] for d in range(DP)]


# ----------------------------------------------------------------------------- rank side
def _logprobs_part(rank, groups):
    from dcd_megatron.loss import vocab_parallel_logprobs

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        logits, targets, grad_out = logits_data(dtype)
        for tp, group, tp_rank in ((1, None, 0), (2, groups["tp2"], rank % 2), (4, groups["tp4"], rank)):
            width = VOCAB // tp
            shard = logits[..., tp_rank * width : (tp_rank + 1) * width].clone().requires_grad_()
            before = shard.detach().clone()
            value = vocab_parallel_logprobs(shard, targets, group=group, chunk_elements=500)
            value.backward(grad_out)
            out[(str(dtype), tp)] = {
                "value": value.detach(),
                "grad": shard.grad,
                "unchanged": torch.equal(shard.detach(), before),
            }
    return out


def _peer_part(rank):
    """sft and huge-tau sigmoid vs megatron's vocab_parallel_cross_entropy at TP=2."""
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    logits, _, _ = logits_data(torch.float32)
    batch = lm_batch()
    width = VOCAB // 2
    shard = logits[..., tp_rank * width : (tp_rank + 1) * width]

    x = shard.clone().requires_grad_()
    ce = tensor_parallel.vocab_parallel_cross_entropy(x.clone(), batch["labels"])  # it overwrites fp32 input
    mask = batch["loss_mask"]
    megatron_loss = (ce * mask).sum() / mask.sum()
    megatron_loss.backward()
    out = {"megatron": (megatron_loss.detach(), x.grad)}
    for name, cfg in (
        ("sft", DCDConfig(method="sft")),
        ("sigmoid_micro", DCDConfig(tau=1e30, normalize="micro")),
        ("sigmoid_global", DCDConfig(tau=1e30, normalize="global")),
        ("gated_power0", DCDConfig(method="gated", gate_power=0.0, normalize="micro")),
    ):
        y = shard.clone().requires_grad_()
        loss_sum, n, report = make_loss_func(cfg, tp_group=tp_group)(batch, y)
        (loss_sum / n).backward()
        factor = 1.0
        if "global_norm" in report:  # the rescale that follows forward_backward_func
            factor = float(report["global_norm"][1] / report["global_norm"][0])
        out[name] = ((loss_sum / n).detach() * factor, y.grad * factor)
    parallel_state.destroy_model_parallel()
    return out


def _cp_part(rank, groups):
    cp_rank, cp_group = rank % 2, groups["tp2"]  # the same pairs of ranks serve as CP groups
    data = packed_rows(7, 2, 16, VOCAB)
    out = {}
    for layout in ("load_balanced", "contiguous"):
        local = {k: split(v, cp_rank, layout) for k, v in data.items()}
        for name, cfg in CP_CONFIGS.items():
            w = dcd_weights(
                local["student_logprobs"], local["teacher_logprobs"], local["loss_mask"], cfg,
                segment_ids=local["segment_ids"], cp_group=cp_group, cp_layout=layout,
                teacher_topk_logprobs=local["teacher_topk_logprobs"], reference_logprobs=local["student_ref_logprobs"],
            )
            if cfg.normalize == "micro":
                w = normalize_weights(w, local["loss_mask"], "micro", group=cp_group)
            out[(layout, name)] = w
        # the loss function's derived response positions use the full rows too
        logits = torch.randn(2, 8, VOCAB // 64)
        batch = {k: local[k] for k in ("loss_mask", "teacher_logprobs", "segment_ids")}
        batch["labels"] = local["labels"] % (VOCAB // 64)
        report = make_loss_func(DCDConfig(), cp_group=cp_group, cp_layout=layout)(batch, logits)[2]
        out[(layout, "by_position")] = report["weight_by_position"]
    return out


class _PerTokenLM(torch.nn.Module):
    """Embedding -> linear to the vocabulary, position-wise (so any CP split is exact)."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(SMALL_VOCAB, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, SMALL_VOCAB)

    def forward(self, tokens):
        return self.head(self.embedding(tokens))


def _global_part(rank):
    """A real forward_backward_func step at DP=2 x CP=2 with DDP and the global rescale."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer import MegatronModule, TransformerConfig

    from dcd_megatron.loss import reduce_reports, rescale_grads_for_global_weight_mean

    parallel_state.initialize_model_parallel(context_parallel_size=CP)
    cp_group = parallel_state.get_context_parallel_group()
    dp_cp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_rank = parallel_state.get_data_parallel_rank()
    cp_rank = parallel_state.get_context_parallel_rank()
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, context_parallel_size=CP,
        calculate_per_token_loss=True, pipeline_dtype=torch.float32,
    )
    config.finalize_model_grads_func = finalize_model_grads

    class Model(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            torch.manual_seed(5)
            self.lm = _PerTokenLM()

        def set_input_tensor(self, tensor):
            pass

        def forward(self, tokens):
            return self.lm(tokens)

    model = Model()
    initial = {k: v.detach().clone() for k, v in model.lm.state_dict().items()}
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    mine = [
        {k: split(v, cp_rank) for k, v in batch.items()}
        for batch in global_batches()[dp_rank]
    ]
    out = {"initial": initial}
    for name, cfg in GLOBAL_CONFIGS.items():
        loss_fn = make_loss_func(cfg, cp_group=cp_group)

        def forward_step(data_iterator, m):
            batch = next(data_iterator)
            return m(batch["tokens"]), functools.partial(loss_fn, batch)

        ddp.zero_grad_buffer()
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mine), model=[ddp],
            num_microbatches=MICRO, seq_length=CP_SEQ // CP, micro_batch_size=MICRO_ROWS,
        )
        factor = rescale_grads_for_global_weight_mean(
            [ddp], reports, pp_group=parallel_state.get_pipeline_model_parallel_group(), dp_cp_group=dp_cp_group
        )
        grads = {n.removeprefix("module.lm."): p.main_grad.clone() for n, p in ddp.named_parameters()}
        out[name] = {"factor": factor, "grads": grads, "metrics": reduce_reports(reports, dp_cp_group)}
    parallel_state.destroy_model_parallel()
    return out


def _rank_main(rank, world_size):
    import torch.distributed as dist

    groups = {"tp2": None, "tp4": dist.group.WORLD}
    for pair in ([0, 1], [2, 3]):
        g = dist.new_group(pair)
        if rank in pair:
            groups["tp2"] = g
    return {
        "logprobs": _logprobs_part(rank, groups),
        "cp": _cp_part(rank, groups),
        "peer": _peer_part(rank),
        "global": _global_part(rank),
    }


@pytest.fixture(scope="module")
def results():
    return run_ranks(_rank_main, WORLD, timeout=840)


# ----------------------------------------------------------------------------- assertions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_logprobs_match_full_vocabulary(results, dtype, tp):
    logits, targets, grad_out = logits_data(dtype)
    full = logits.double().requires_grad_()
    ref = torch.log_softmax(full, -1).gather(-1, targets[..., None]).squeeze(-1)
    ref.backward(grad_out.double())
    parts = [r["logprobs"][(str(dtype), tp)] for r in results]
    assert all(p["unchanged"] for p in parts), "logits were modified in place"
    # bf16 logits are exact inputs; the fp32 value differs from the fp64 reference only by
    # summation order. The bf16 gradient carries bf16 rounding: 2^-8 of its magnitude.
    grad_tol = 1e-6 if dtype == torch.float32 else 2**-8 * float(grad_out.abs().max())
    ranks = range(tp) if tp > 1 else [0]
    for r in range(WORLD):
        torch.testing.assert_close(parts[r]["value"].double(), ref.detach(), rtol=0, atol=2e-5)
    grad = torch.cat([parts[r]["grad"] for r in ranks], dim=-1) if tp > 1 else parts[0]["grad"]
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), full.grad, rtol=0, atol=grad_tol)


@pytest.mark.parametrize("name", ["sft", "sigmoid_micro", "sigmoid_global", "gated_power0"])
def test_peer_check_against_megatron_cross_entropy(results, name):
    for r in results:
        loss, grad = r["peer"][name]
        ref_loss, ref_grad = r["peer"]["megatron"]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["load_balanced", "contiguous"])
@pytest.mark.parametrize("name", list(CP_CONFIGS))
def test_context_parallel_weights_are_exact(results, layout, name):
    data = packed_rows(7, 2, 16, VOCAB)
    cfg = CP_CONFIGS[name]
    ref = dcd_weights(data["student_logprobs"], data["teacher_logprobs"], data["loss_mask"], cfg,
                      segment_ids=data["segment_ids"], teacher_topk_logprobs=data["teacher_topk_logprobs"],
                      reference_logprobs=data["student_ref_logprobs"])
    if cfg.normalize == "micro":
        ref = normalize_weights(ref, data["loss_mask"], "micro")
    for cp_rank in (0, 1):
        for r in (cp_rank, 2 + cp_rank):  # both CP groups did the same computation
            torch.testing.assert_close(results[r]["cp"][(layout, name)], split_for_rank(ref, cp_rank, 2, layout),
                                       rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["load_balanced", "contiguous"])
def test_context_parallel_response_positions_are_exact(results, layout):
    data = packed_rows(7, 2, 16, VOCAB)
    batch = {k: data[k] for k in ("loss_mask", "teacher_logprobs", "segment_ids")}
    batch["labels"] = data["labels"] % (VOCAB // 64)
    report = make_loss_func(DCDConfig())(batch, torch.randn(2, 16, VOCAB // 64))[2]
    combined = results[0]["cp"][(layout, "by_position")] + results[1]["cp"][(layout, "by_position")]
    torch.testing.assert_close(combined[:, 1], report["weight_by_position"][:, 1])  # token counts per bin


@pytest.mark.parametrize("name", list(GLOBAL_CONFIGS))
def test_global_normalisation_over_dp_cp_and_micro_batches(results, name):
    cfg = GLOBAL_CONFIGS[name]
    model = _PerTokenLM()
    model.load_state_dict(results[0]["global"]["initial"])
    batches = [b for per_dp in global_batches() for b in per_dp]
    us, terms, masks = [], [], []
    for batch in batches:
        s = torch.log_softmax(model(batch["tokens"]), -1).gather(-1, batch["labels"][..., None]).squeeze(-1)
        us.append(dcd_weights(s.detach(), batch["teacher_logprobs"], batch["loss_mask"], cfg,
                              segment_ids=batch["segment_ids"], teacher_topk_logprobs=batch["teacher_topk_logprobs"],
                              reference_logprobs=batch["student_ref_logprobs"]))
        terms.append(-s)
        masks.append(batch["loss_mask"])
    u, term, mask = torch.cat(us), torch.cat(terms), torch.cat(masks)
    w = normalize_weights(u, mask, "global")  # one process holds the whole global batch
    ((w * term * mask).sum() / mask.sum()).backward()
    expected = dict(model.named_parameters())
    for r in results:
        got = r["global"][name]
        assert got["factor"] == pytest.approx(float(mask.sum() / u.sum()), rel=1e-6)
        assert got["metrics"]["tokens"] == float(mask.sum())
        assert got["metrics"]["weight_mean"] == pytest.approx(float(u.sum() / mask.sum()), rel=1e-6)
        for pname, grad in got["grads"].items():
            torch.testing.assert_close(grad, expected[pname].grad, rtol=1e-5, atol=1e-7, msg=pname)
