"""Single-process checks of the DCD loss: each weight against a plain reference, gradients,
bad inputs, reports and the global rescale (no megatron-core, no process groups)."""

import functools
import math
import statistics

import pytest
import torch

from dcd_megatron.loss import (
    DCDConfig,
    dcd_weights,
    make_loss_func,
    normalize_weights,
    reduce_reports,
    rescale_grads_for_global_weight_mean,
    vocab_parallel_logprobs,
)
from dcd_megatron.loss import weights as weights_mod
from dcd_megatron.loss.report import SERIES_KEYS

B, S, V, K = 3, 12, 29, 4


# ----------------------------------------------------------------------------- references
def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _documents(seg_row):
    """Contiguous runs of equal segment ids: list of position lists."""
    docs, current = [], [0]
    for t in range(1, len(seg_row)):
        if seg_row[t] != seg_row[t - 1]:
            docs.append(current)
            current = []
        current.append(t)
    docs.append(current)
    return docs


def reference_entropy(topk_row):
    """Entropy of one token's teacher top-k (NaN = unknown, probability 0) plus the residual bucket."""
    known = [x for x in topk_row if math.isfinite(x)]
    h = -sum(math.exp(x) * x for x in known)
    r = max(1.0 - sum(math.exp(x) for x in known), 0.0)
    return h - (r * math.log(r) if r > 0 else 0.0)


def reference_weights(s, a, mask, seg, cfg, step=0, topk=None):
    """The weights of docs/loss.md written out token by token in Python floats."""
    s, mask = s.double().tolist(), mask.tolist()
    a = a.double().tolist() if a is not None else None
    topk = topk.double().tolist() if topk is not None else None
    seg = seg.tolist() if seg is not None else [[0] * len(row) for row in s]
    tau = cfg.tau_at(step)
    c = cfg.clip
    clip = lambda x: min(max(x, -c), c)  # noqa: E731
    out = [[0.0] * len(row) for row in s]
    stats = [[None] * len(row) for row in s]  # the statistic z fed to the transform
    for i, row in enumerate(s):
        for doc in _documents(seg[i]):
            resp = [t for t in doc if mask[i][t]]
            for t in doc:
                if not mask[i][t]:
                    continue
                l_t = row[t] - a[i][t] if a is not None else None
                if cfg.method in ("sigmoid", "tis", "gated"):
                    stats[i][t] = clip(l_t)
                elif cfg.method == "student_only":
                    stats[i][t] = clip(row[t]) if cfg.student_only_form == "sigmoid" else row[t]
                elif cfg.method == "prefix":
                    prior = [row[k] - a[i][k] for k in resp if k < t]
                    if cfg.prefix_window:
                        prior = prior[-cfg.prefix_window :]
                    stats[i][t] = clip(sum(prior) / len(prior)) if prior else 0.0
                elif cfg.method == "sequence":
                    stats[i][t] = clip(sum(row[k] - a[i][k] for k in resp) / len(resp))
    valid_stats = [z for row in stats for z in row if z is not None]
    bias = statistics.median(valid_stats) if cfg.bias_mode == "median" and valid_stats else cfg.bias
    for i, row in enumerate(stats):
        for t, z in enumerate(row):
            if not mask[i][t]:
                continue
            m = cfg.method
            if m == "sft":
                out[i][t] = 1.0
                continue
            if m == "sigmoid" or (m == "student_only" and cfg.student_only_form == "sigmoid") or (
                m == "prefix" and cfg.prefix_transform == "sigmoid"
            ):
                u = _sigmoid((z - bias) / tau)
            elif m == "gated":  # g + (1 - g) * sigmoid, g = exp(gate_power * log-confidence)
                confidence = a[i][t] if cfg.gate == "token" else -reference_entropy(topk[i][t])
                g = math.exp(cfg.gate_power * min(confidence, 0.0))
                u = g + (1.0 - g) * _sigmoid((z - bias) / tau)
            elif m == "student_only":
                u = math.exp(cfg.beta * z)
            elif m == "tis":
                u = math.exp(cfg.alpha * z)
            else:  # prefix exp, sequence
                u = math.exp(z)
            out[i][t] = min(max(u, cfg.floor), cfg.cap)
    return torch.tensor(out, dtype=torch.float64)


def make_batch(seed=0, with_segments=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g) * 2
    labels = torch.randint(0, V, (B, S), generator=g)
    mask = (torch.rand(B, S, generator=g) > 0.25).float()
    mask[:, 0] = 0  # prompt-like start
    teacher = -torch.rand(B, S, generator=g) * 4
    batch = {"labels": labels, "loss_mask": mask, "teacher_logprobs": teacher,
             "teacher_topk_logprobs": make_topk(seed)}
    if with_segments:
        seg = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [7] * 12, [3] * 2 + [4] * 6 + [9] * 4])
        batch["segment_ids"] = seg
    return logits, batch


def make_topk(seed, k=K):
    """Teacher top-k log-probs ``[B, S, k]`` of a random distribution: spread, peaked and one-hot
    tokens, a partly unknown one, and none on the (masked-out) first position."""
    g = torch.Generator().manual_seed(seed + 1000)
    sharpness = torch.rand(B, S, 1, generator=g) * 6
    topk = torch.log_softmax(torch.randn(B, S, V, generator=g) * sharpness, -1).topk(k, dim=-1).values
    topk[0, 2] = torch.tensor([0.0] + [-math.inf] * (k - 1))  # one-hot: all the mass on one token
    topk[1, 3, 2:] = math.nan  # only two entries known
    topk[:, 0] = math.nan  # masked-out position: no top-k
    return topk


def student_logprobs(logits, labels):
    return torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).squeeze(-1)


CONFIGS = [
    DCDConfig(method="sft"),
    DCDConfig(trajectory=False, method="sigmoid", tau=0.7, bias=-0.5),
    DCDConfig(trajectory=False, method="sigmoid", bias_mode="median", floor=0.2),
    DCDConfig(method="student_only", tau=2.0, clip=1.5),
    DCDConfig(method="student_only", student_only_form="power", beta=0.5),
    DCDConfig(method="tis", alpha=0.8, cap=1.5, floor=0.05),
    DCDConfig(method="prefix"),
    DCDConfig(method="prefix", prefix_window=2, cap=1.2),
    DCDConfig(method="prefix", prefix_transform="sigmoid", bias_mode="median", tau=0.5),
    DCDConfig(method="sequence", clip=1.0, cap=3.0),
    DCDConfig(trajectory=False, method="sigmoid", tau=0.5, tau_end=4.0, tau_anneal_steps=10),
    DCDConfig(trajectory=False, method="gated", gate_power=4.0, tau=0.5),
    DCDConfig(trajectory=False, method="gated", gate_power=1.0, bias_mode="median", normalize="micro", cap=0.9),
    DCDConfig(trajectory=False, method="gated", gate="entropy", gate_power=2.0, bias=-0.5, floor=0.05),
    DCDConfig(trajectory=False, method="gated", gate="entropy", bias_mode="median", tau=0.7, tau_end=2.0, tau_anneal_steps=10),
]


def _config_id(c):
    return f"{c.method}-{c.bias_mode}-{c.prefix_window}-{c.student_only_form}-{c.gate}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("with_segments", [True, False])
def test_weights_match_plain_reference(cfg, with_segments):
    logits, batch = make_batch(with_segments=with_segments)
    s = student_logprobs(logits, batch["labels"]).float()
    seg = batch.get("segment_ids")
    step = 5
    topk = batch["teacher_topk_logprobs"]
    got = dcd_weights(s, batch["teacher_logprobs"], batch["loss_mask"], cfg, segment_ids=seg, step=step,
                      teacher_topk_logprobs=topk)
    want = reference_weights(s, batch["teacher_logprobs"], batch["loss_mask"], seg, cfg, step=step, topk=topk)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)
    assert (got[batch["loss_mask"] == 0] == 0).all()


def test_prefix_resets_at_document_boundaries():
    """A huge log-ratio in one document must not leak into the next packed document."""
    cfg = DCDConfig(method="prefix", clip=50.0, cap=1e9)
    s = torch.zeros(1, 8)
    teacher = torch.zeros(1, 8)
    teacher[0, 1] = -10.0  # l = +10 in document 0
    mask = torch.ones(1, 8)
    seg = torch.tensor([[0, 0, 0, 0, 5, 5, 5, 5]])
    w = dcd_weights(s, teacher, mask, cfg, segment_ids=seg)
    assert w[0, 2] == pytest.approx(math.exp(5.0), rel=1e-5)  # mean of l over k<2: (0+10)/2
    assert torch.allclose(w[0, 4:], torch.ones(4))  # the next document starts afresh
    w_one_doc = dcd_weights(s, teacher, mask, cfg)
    assert w_one_doc[0, 4] == pytest.approx(math.exp(10.0 / 4), rel=1e-5)  # without segments it leaks


def test_tau_schedule_reaches_the_weights():
    logits, batch = make_batch()
    s = student_logprobs(logits, batch["labels"]).float()
    cfg = DCDConfig(tau=0.5, tau_end=3.0, tau_anneal_steps=10)
    late = dcd_weights(s, batch["teacher_logprobs"], batch["loss_mask"], cfg, step=10)
    fixed = dcd_weights(s, batch["teacher_logprobs"], batch["loss_mask"], DCDConfig(tau=3.0))
    early = dcd_weights(s, batch["teacher_logprobs"], batch["loss_mask"], cfg, step=0)
    torch.testing.assert_close(late, fixed)
    assert not torch.allclose(early, late)


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_match_log_softmax_and_leave_input_alone(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 7, 1004, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 1004, (4, 7), generator=g)
    before = logits.detach().clone()
    grad_out = torch.randn(4, 7, generator=g)
    out = vocab_parallel_logprobs(logits, targets, chunk_elements=3000)  # several row blocks
    out.backward(grad_out)
    ref_in = logits.detach().double().requires_grad_()
    ref = torch.log_softmax(ref_in, -1).gather(-1, targets[..., None]).squeeze(-1)
    ref.backward(grad_out.double())
    assert out.dtype == torch.float32 and logits.grad.dtype == dtype
    assert torch.equal(logits.detach(), before)
    # fp32: rounding of a 1004-term log-sum-exp; bf16: the input is exact, the fp32 result
    # differs only by summation order, while the bf16 gradient carries bf16 rounding (2^-8 relative).
    torch.testing.assert_close(out.double(), ref.detach(), rtol=0, atol=1e-5)
    grad_tol = 1e-6 if dtype == torch.float32 else 2**-8 * float(grad_out.abs().max())
    torch.testing.assert_close(logits.grad.double(), ref_in.grad, rtol=0, atol=grad_tol)


def test_logprobs_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3, 50, generator=g).requires_grad_()
    targets = torch.randint(0, 50, (5, 3), generator=g)
    grads = []
    outs = []
    for chunk in (1, 60, 1 << 22):
        x = logits.detach().clone().requires_grad_()
        out = vocab_parallel_logprobs(x, targets, chunk_elements=chunk)
        out.sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    for o, gr in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(o, outs[0])
        torch.testing.assert_close(gr, grads[0])


def test_logprobs_reject_bad_shapes_and_dtypes():
    with pytest.raises(ValueError, match="trailing vocabulary"):
        vocab_parallel_logprobs(torch.randn(2, 3, 5), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        vocab_parallel_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 3))


# ----------------------------------------------------------------------------- loss function
def _loss_and_grad(cfg, logits, batch, **kw):
    x = logits.detach().clone().requires_grad_()
    loss, n, report = make_loss_func(cfg, **kw)(batch, x)
    loss.backward()
    return loss.detach(), int(n), report, x.grad


@pytest.mark.parametrize("cfg", CONFIGS[1:], ids=_config_id)
def test_gradient_is_weighted_sft_with_constant_weights(cfg):
    logits, batch = make_batch(seed=3)
    # teacher inputs that ask for a gradient get none: the weights are constants
    batch["teacher_logprobs"].requires_grad_()
    batch["teacher_topk_logprobs"].requires_grad_()
    loss, n, _, grad = _loss_and_grad(cfg, logits, batch, step=5)
    assert batch["teacher_logprobs"].grad is None and batch["teacher_topk_logprobs"].grad is None
    # Reference: weights computed once and used as constants in a plain log_softmax loss.
    x = logits.detach().clone().requires_grad_()
    s = torch.log_softmax(x, -1).gather(-1, batch["labels"][..., None]).squeeze(-1)
    w = dcd_weights(s.detach(), batch["teacher_logprobs"], batch["loss_mask"], cfg,
                    segment_ids=batch["segment_ids"], step=5, teacher_topk_logprobs=batch["teacher_topk_logprobs"])
    if cfg.normalize == "micro":
        w = normalize_weights(w, batch["loss_mask"], "micro")
    ref = (w * batch["loss_mask"] * -s).sum()
    ref.backward()
    assert n == int(batch["loss_mask"].sum())
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", ["micro", "global"])
def test_sigmoid_with_huge_tau_is_sft(normalize):
    logits, batch = make_batch(seed=4)
    sft_loss, n, _, sft_grad = _loss_and_grad(DCDConfig(method="sft", normalize=normalize), logits, batch)
    loss, n2, report, grad = _loss_and_grad(DCDConfig(method="sigmoid", tau=1e30, normalize=normalize), logits, batch)
    factor = 1.0
    if normalize == "global":  # what rescale_grads_for_global_weight_mean applies after backward
        factor = float(report["global_norm"][1] / report["global_norm"][0])
        assert factor == pytest.approx(2.0)  # sigmoid(0) = 1/2
    assert n == n2
    torch.testing.assert_close(loss * factor, sft_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad * factor, sft_grad, rtol=1e-6, atol=1e-9)


def test_all_weights_one_equals_sft():
    """tis with cap = floor = 1 forces w == 1: identical loss and gradient to sft."""
    logits, batch = make_batch(seed=5)
    sft = _loss_and_grad(DCDConfig(method="sft"), logits, batch)
    ones = _loss_and_grad(DCDConfig(method="tis", floor=1.0, cap=1.0), logits, batch)
    torch.testing.assert_close(ones[0], sft[0])
    torch.testing.assert_close(ones[3], sft[3])


def test_custom_token_term_replaces_nll():
    logits, batch = make_batch(seed=6)
    cfg = DCDConfig(method="sft")
    calls = []

    def double_nll(lg, bt, s):
        calls.append(lg.shape)
        return -2.0 * s

    base = _loss_and_grad(cfg, logits, batch)
    doubled = _loss_and_grad(cfg, logits, batch, token_term=double_nll)
    assert calls == [logits.shape]
    torch.testing.assert_close(doubled[0], 2 * base[0])
    torch.testing.assert_close(doubled[3], 2 * base[3])


# ----------------------------------------------------------------------------- bad inputs
def test_shape_mismatches_are_named():
    logits, batch = make_batch()
    fn = make_loss_func(DCDConfig())
    for key in ("labels", "loss_mask", "teacher_logprobs", "segment_ids"):
        bad = dict(batch)
        bad[key] = batch[key][:, :-1]
        with pytest.raises(ValueError, match=key):
            fn(bad, logits)
    with pytest.raises(ValueError, match=r"\[b, s, V/tp\]"):
        fn(batch, logits[0])
    with pytest.raises(ValueError, match="labels"):
        fn({k: v for k, v in batch.items() if k != "labels"}, logits)
    with pytest.raises(ValueError, match="integer"):
        fn({**batch, "labels": batch["labels"].float()}, logits)
    with pytest.raises(ValueError, match="student_logprobs"):
        dcd_weights(torch.zeros(2, 3, 4), None, torch.ones(2, 3, 4), DCDConfig(method="sft"))
    with pytest.raises(ValueError, match="loss_mask"):
        dcd_weights(torch.zeros(2, 3), None, torch.ones(2, 4), DCDConfig(method="sft"))


@pytest.mark.parametrize("method", ["sigmoid", "tis", "prefix", "sequence", "gated"])
def test_missing_teacher_is_a_clear_error(method):
    logits, batch = make_batch()
    del batch["teacher_logprobs"]
    with pytest.raises(ValueError, match=rf"'{method}'.*teacher.*dcd-score"):
        make_loss_func(DCDConfig(method=method))(batch, logits)
    with pytest.raises(ValueError, match=rf"'{method}'.*dcd-score"):
        dcd_weights(torch.zeros(B, S), None, batch["loss_mask"], DCDConfig(method=method))


@pytest.mark.parametrize("method", ["sft", "student_only"])
def test_teacher_free_methods_run_without_teacher(method):
    logits, batch = make_batch()
    del batch["teacher_logprobs"]
    loss, n, report = make_loss_func(DCDConfig(method=method))(batch, logits)
    assert torch.isfinite(loss) and report["log_ratio"][1] == 0
    assert "log_ratio_mean" not in reduce_reports([report])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_teacher_on_masked_in_tokens_is_an_error(bad):
    logits, batch = make_batch()
    teacher = batch["teacher_logprobs"].clone()
    i, t = (batch["loss_mask"] > 0).nonzero()[0].tolist()
    teacher[i, t] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        make_loss_func(DCDConfig())({**batch, "teacher_logprobs": teacher}, logits)
    with pytest.raises(ValueError, match="NaN/inf"):
        dcd_weights(torch.zeros(B, S), teacher, batch["loss_mask"], DCDConfig())


def test_garbage_on_masked_out_tokens_is_ignored():
    logits, batch = make_batch()
    out = batch["loss_mask"] == 0
    teacher = batch["teacher_logprobs"].masked_fill(out, float("nan"))
    labels = batch["labels"].masked_fill(out, -100)
    clean = _loss_and_grad(DCDConfig(method="sequence"), logits, batch)
    dirty = _loss_and_grad(DCDConfig(method="sequence"), logits, {**batch, "teacher_logprobs": teacher, "labels": labels})
    torch.testing.assert_close(dirty[0], clean[0])
    torch.testing.assert_close(dirty[3], clean[3])


def test_labels_outside_vocab_on_masked_in_tokens_are_an_error():
    logits, batch = make_batch()
    labels = batch["labels"].clone()
    i, t = (batch["loss_mask"] > 0).nonzero()[0].tolist()
    labels[i, t] = V
    with pytest.raises(ValueError, match="outside the vocabulary"):
        make_loss_func(DCDConfig())({**batch, "labels": labels}, logits)


@pytest.mark.parametrize("normalize", ["global", "micro", "none"])
@pytest.mark.parametrize("method", ["sigmoid", "prefix", "sequence", "gated"])
def test_all_masked_batch_is_zero_and_finite(method, normalize):
    logits, batch = make_batch()
    batch["loss_mask"] = torch.zeros(B, S)
    loss, n, report, grad = _loss_and_grad(DCDConfig(method=method, normalize=normalize), logits, batch)
    assert float(loss) == 0.0 and n == 0
    assert torch.count_nonzero(grad) == 0
    assert all(torch.isfinite(v).all() for v in report.values())
    reduced = reduce_reports([report, report])
    assert reduced["tokens"] == 0
    assert all(math.isfinite(v) for k, v in reduced.items() if k not in SERIES_KEYS)


# ----------------------------------------------------------------------------- normalisation, reports
def test_normalize_weights_scopes():
    w = torch.tensor([[0.5, 2.0, 9.0], [1.5, 0.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    micro = normalize_weights(w, mask, "micro")
    assert float(micro[mask > 0].mean()) == pytest.approx(1.0)
    torch.testing.assert_close(micro, w * 4 / 4.0)
    assert normalize_weights(w, mask, "none") is w
    zeros = torch.zeros(2, 3)
    torch.testing.assert_close(normalize_weights(zeros, mask, "micro"), zeros)
    with pytest.raises(ValueError, match="scope"):
        normalize_weights(w, mask, "batch")


def test_reduce_reports_matches_direct_statistics():
    cfg = DCDConfig(method="tis", cap=1.8, floor=0.02)
    fn = make_loss_func(cfg)
    reports, ws, nlls, ls, fracs = [], [], [], [], []
    for seed in (10, 11, 12):
        logits, batch = make_batch(seed=seed)
        batch["response_frac"] = torch.rand(B, S, generator=torch.Generator().manual_seed(seed))
        reports.append(fn(batch, logits)[2])
        s = student_logprobs(logits, batch["labels"]).float()
        m = batch["loss_mask"] > 0
        w = dcd_weights(s, batch["teacher_logprobs"], batch["loss_mask"], cfg)
        ws.append(w[m].double())
        nlls.append(-s[m].double())
        ls.append((s - batch["teacher_logprobs"])[m].double())
        fracs.append(batch["response_frac"][m].double())
    w, nll, l, frac = (torch.cat(x) for x in (ws, nlls, ls, fracs))
    r = reduce_reports(reports)
    n = w.numel()
    assert r["tokens"] == n
    assert r["weight_mean"] == pytest.approx(float(w.mean()))
    assert r["weight_std"] == pytest.approx(float(w.std(unbiased=False)), rel=1e-6)
    assert r["ess"] == pytest.approx(float(w.sum() ** 2 / (n * (w**2).sum())))
    assert r["ce"] == pytest.approx(float(nll.mean()))
    assert r["weighted_ce"] == pytest.approx(float((w * nll).mean()))
    assert r["weighted_ce_normalized"] == pytest.approx(float((w / w.mean() * nll).mean()))
    assert r["norm_factor"] == pytest.approx(float(1 / w.mean()))
    assert r["loss"] == pytest.approx(r["weighted_ce_normalized"])  # global: the rescaled objective
    assert r["loss_unnormalized"] == pytest.approx(r["weighted_ce"])
    assert r["log_ratio_mean"] == pytest.approx(float(l.mean()), rel=1e-5)
    assert r["weight_min"] == pytest.approx(float(w.min())) and r["weight_max"] == pytest.approx(float(w.max()))
    at_cap, at_floor = float((w > 1.8 - 1e-6).double().mean()), float((w < 0.02 + 1e-8).double().mean())
    assert at_cap > 0 and at_floor > 0  # the data exercises both clamps
    assert r["weight_at_cap_frac"] == pytest.approx(at_cap)
    assert r["weight_at_floor_frac"] == pytest.approx(at_floor)
    bin_ratio = 10 ** (1 / 20)  # one histogram bin
    for q in (50, 90, 99):
        exact = float(torch.quantile(w, q / 100))
        assert exact / bin_ratio <= r[f"weight_p{q}"] <= exact * bin_ratio, (q, exact, r[f"weight_p{q}"])
    assert r["weight_first10"] == pytest.approx(float(w[frac < 0.1].mean()))
    assert r["weight_last10"] == pytest.approx(float(w[frac >= 0.9].mean()))
    assert sum(r["weight_hist_counts"]) == n and len(r["weight_hist_edges"]) == len(r["weight_hist_counts"]) + 1
    assert len(r["weight_by_position"]) == 20 and sum(r["weight_by_position_count"]) == n


def test_response_frac_is_derived_from_segments_and_mask():
    logits, batch = make_batch(seed=7)
    mask = torch.zeros(B, S)
    mask[0, 1:5] = 1  # document 0 (positions 0-4): 4 response tokens
    mask[0, 9:12] = 1  # document 2: 3 response tokens
    batch["loss_mask"] = mask
    report = make_loss_func(DCDConfig(method="sft"))(batch, logits)[2]
    counts = report["weight_by_position"][:, 1]
    # positions j/n: 0, .25, .5, .75 and 0, 1/3, 2/3 -> bins 0, 5, 10, 15 and 0, 6, 13
    expected = torch.zeros(20, dtype=torch.float64)
    for b in (0, 5, 10, 15, 0, 6, 13):
        expected[b] += 1
    torch.testing.assert_close(counts, expected)


# ----------------------------------------------------------------------------- global rescale
class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, 8)
        self.out = torch.nn.Linear(8, V)

    def forward(self, tokens):
        return self.out(self.emb(tokens))


def test_rescale_makes_weights_mean_one_over_all_micro_batches():
    cfg = DCDConfig(method="sequence")
    batches = [make_batch(seed=s)[1] for s in (20, 21, 22)]
    tokens = [torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(s)) for s in (20, 21, 22)]
    model = _TinyLM()
    fn = make_loss_func(cfg)
    reports, total = [], 0
    for tok, batch in zip(tokens, batches):
        loss, n, report = fn(batch, model(tok))
        loss.backward()
        reports.append(report)
        total += int(n)
    for p in model.parameters():  # what megatron's finalize_model_grads does with per-token loss
        p.grad /= total
    factor = rescale_grads_for_global_weight_mean([model], reports)

    ref = _TinyLM()
    us, terms, masks = [], [], []
    for tok, batch in zip(tokens, batches):
        s = torch.log_softmax(ref(tok), -1).gather(-1, batch["labels"][..., None]).squeeze(-1)
        us.append(dcd_weights(s.detach(), batch["teacher_logprobs"], batch["loss_mask"], cfg,
                              segment_ids=batch["segment_ids"]))
        terms.append(-s)
        masks.append(batch["loss_mask"])
    u, term, mask = torch.cat(us), torch.cat(terms), torch.cat(masks)
    w = u / u[mask > 0].mean()
    ((w * term * mask).sum() / mask.sum()).backward()
    assert factor == pytest.approx(float(1 / u[mask > 0].mean()))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_rescale_is_a_no_op_for_micro_normalisation():
    logits, batch = make_batch()
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    before = model.weight.grad.clone()
    report = make_loss_func(DCDConfig(normalize="micro"))(batch, logits)[2]
    assert rescale_grads_for_global_weight_mean([model], [report]) == 1.0
    assert torch.equal(model.weight.grad, before)
    assert rescale_grads_for_global_weight_mean([model], []) == 1.0  # a non-last pipeline stage


def test_loss_function_is_megatron_partial_friendly():
    logits, batch = make_batch()
    fn = functools.partial(make_loss_func(DCDConfig()), batch)
    loss, n, report = fn(logits)
    assert loss.dim() == 0 and n.dtype == torch.int and all(v.dtype == torch.float64 for v in report.values())


# ----------------------------------------------------------------------------- the gated method
GATES = ["token", "entropy"]


@pytest.mark.parametrize("normalize", ["global", "micro", "none"])
@pytest.mark.parametrize("gate", GATES)
def test_gated_with_gate_power_zero_is_sft_exactly(gate, normalize):
    """g = exp(0) = 1 on every token: u = 1, the same loss, gradient and normalisation as sft."""
    logits, batch = make_batch(seed=8)
    sft = _loss_and_grad(DCDConfig(method="sft", normalize=normalize), logits, batch)
    gated = _loss_and_grad(DCDConfig(method="gated", gate=gate, gate_power=0.0, tau=0.3, normalize=normalize),
                           logits, batch)
    assert torch.equal(gated[0], sft[0]) and gated[1] == sft[1]
    assert torch.equal(gated[3], sft[3])
    for key in ("weight", "weight_sq", "weighted_ce", "global_norm"):
        if key in sft[2]:
            assert torch.equal(gated[2][key], sft[2][key]), key


@pytest.mark.parametrize("gate", GATES)
def test_gated_tends_to_sigmoid_as_gate_power_grows(gate):
    """Where the teacher was unsure (a < 0, H > 0) the gate closes: u -> the sigmoid weight."""
    logits, batch = make_batch(seed=9)
    s = student_logprobs(logits, batch["labels"]).float()
    teacher = -0.05 - torch.rand(B, S, generator=torch.Generator().manual_seed(9)) * 4  # a <= -0.05
    topk = batch["teacher_topk_logprobs"]
    entropy = weights_mod.teacher_entropy(topk)
    mask = batch["loss_mask"] * (entropy > 0.01)  # a (near) one-hot top-k keeps the entropy gate open
    assert int(mask.sum()) >= 20
    sigmoid = dcd_weights(s, teacher, mask, DCDConfig(method="sigmoid", tau=0.5, bias=0.3))
    gaps = []
    for power in (0.5, 2.0, 8.0, 1e4):
        cfg = DCDConfig(method="gated", gate=gate, gate_power=power, tau=0.5, bias=0.3)
        got = dcd_weights(s, teacher, mask, cfg, teacher_topk_logprobs=topk)
        assert bool((got >= sigmoid - 1e-7).all())  # u = sigmoid + g (1 - sigmoid) >= sigmoid
        gaps.append(float((got - sigmoid).abs().max()))
    assert gaps[0] > 0.1 and all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 1e-6, gaps


@pytest.mark.parametrize("student_p", [1e-9, 1e-4, 0.01, 0.3, 0.99, 1.0])
def test_teacher_certain_token_keeps_full_weight(student_p):
    """A token the teacher was sure of is knowledge: weight ~1 whatever the student's probability,
    where the sigmoid weight starves it."""
    s = torch.full((1, 3), math.log(student_p))
    teacher = torch.tensor([[0.0, math.log(0.999), math.log(0.2)]])  # certain, near-certain, a fork
    mask = torch.ones(1, 3)
    cfg = DCDConfig(method="gated", gate_power=16.0, tau=0.5, trajectory=False)  # the per-token weight
    got = dcd_weights(s, teacher, mask, cfg)
    assert float(got[0, 0]) == 1.0
    assert float(got[0, 1]) >= 0.999**16 - 1e-6 > 0.98
    sig = dcd_weights(s, teacher, mask, DCDConfig(method="sigmoid", tau=0.5, trajectory=False))
    # the fork follows the student's preference: the sigmoid weight, up to the tiny gate 0.2**16
    assert float(got[0, 2]) == pytest.approx(float(sig[0, 2]), abs=0.2**16 + 1e-7)
    if student_p < 0.01:
        assert float(sig[0, 0]) < 0.01  # what the gate protects the certain token from


def test_teacher_entropy_of_topk_and_residual():
    """H over the top-k plus the residual bucket; NaN and -inf entries count as probability 0."""
    rows = [
        [0.0, -math.inf, -math.inf],  # one-hot
        [0.0, math.nan, math.nan],  # one-hot, the rest unknown
        [math.log(0.5), math.log(0.25), math.nan],  # residual bucket 0.25
        [math.log(1 / 3)] * 3,  # uniform, no residual
    ]
    want = [0.0, 0.0, -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), math.log(3)]
    got = weights_mod.teacher_entropy(torch.tensor(rows))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    for row, h in zip(rows, want):
        assert reference_entropy(row) == pytest.approx(h, abs=1e-12)


@pytest.mark.parametrize("student_p", [1e-6, 0.5])
def test_entropy_gate_with_one_hot_teacher_gives_gate_one(student_p):
    """A one-hot teacher top-k has H = 0: g = 1 and u = 1, whatever the student and the sampled
    token's log-prob; a uniform top-4 gives g = 4**-gate_power."""
    s = torch.full((1, 2), math.log(student_p))
    teacher = torch.full((1, 2), -3.0)
    topk = torch.tensor([[[0.0, -math.inf, -math.inf, -math.inf], [math.log(0.25)] * 4]])
    cfg = DCDConfig(method="gated", gate="entropy", gate_power=1.5, tau=0.5, bias=1.0)
    got = dcd_weights(s, teacher, torch.ones(1, 2), cfg, teacher_topk_logprobs=topk)
    assert float(got[0, 0]) == 1.0
    g = 4.0**-1.5
    sig = _sigmoid((max(math.log(student_p) + 3.0, -5.0) - 1.0) / 0.5)  # clip(l) = clip(s - a) at -5
    assert float(got[0, 1]) == pytest.approx(g + (1 - g) * sig, rel=1e-5)


def _one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_entropy_gate_without_topk_is_a_one_line_error_naming_the_fix():
    logits, batch = make_batch()
    del batch["teacher_topk_logprobs"]
    cfg = DCDConfig(method="gated", gate="entropy")
    hidden, weight = torch.randn(B, S, 5), torch.randn(V, 5)
    for call in (
        lambda: make_loss_func(cfg)(batch, logits),
        lambda: make_loss_func(cfg)(batch, hidden, output_weight=weight),  # the chunked path
        lambda: dcd_weights(torch.zeros(B, S), batch["teacher_logprobs"], batch["loss_mask"], cfg),
    ):
        with pytest.raises(ValueError, match="loss.gate=entropy needs teacher top-k") as excinfo:
            call()
        message = _one_line_error(excinfo)
        assert "data.topk" in message and "dcd-score --top-k" in message and "loss.gate=token" in message
    make_loss_func(DCDConfig(method="gated"))(batch, logits)  # the token gate needs no top-k


def test_entropy_gate_with_topk_missing_on_a_trained_token_is_a_one_line_error():
    logits, batch = make_batch()
    topk = batch["teacher_topk_logprobs"].clone()
    i, t = (batch["loss_mask"] > 0).nonzero()[0].tolist()
    topk[i, t] = math.nan
    broken = {**batch, "teacher_topk_logprobs": topk}
    cfg = DCDConfig(method="gated", gate="entropy")
    hidden, weight = torch.randn(B, S, 5), torch.randn(V, 5)
    for call in (
        lambda: make_loss_func(cfg)(broken, logits),
        lambda: make_loss_func(cfg)(broken, hidden, output_weight=weight),
        lambda: dcd_weights(torch.zeros(B, S), batch["teacher_logprobs"], batch["loss_mask"], cfg,
                            teacher_topk_logprobs=topk),
    ):
        with pytest.raises(ValueError, match=r"1 trained token\(s\) have no teacher top-k") as excinfo:
            call()
        assert "loss.gate=token" in _one_line_error(excinfo)
    with pytest.raises(ValueError, match=r"must be \[b, s, k\]"):
        make_loss_func(cfg)({**batch, "teacher_topk_logprobs": topk[:, :-1]}, logits)
    make_loss_func(DCDConfig(method="gated"))(broken, logits)  # the token gate never reads it
