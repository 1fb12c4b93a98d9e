"""The drift lab's pieces without megatron-core: task, data sets, config, arms, KV decoding, stats, report."""

from __future__ import annotations

import math
import random

import pytest
import torch

from dcd_megatron.configs import apply_overrides
from dcd_megatron.lab import data as labdata
from dcd_megatron.lab import task
from dcd_megatron.lab.arms import ARMS, arm_loss
from dcd_megatron.lab.config import LabConfig, LabConfigError, NetConfig, tiny_lab_config, trace_tokens
from dcd_megatron.lab.evaluate import BRANCH_POSITION, token_batch, weights_by_style
from dcd_megatron.model.kv_decoder import KVCachedGPT
from dcd_megatron.lab.sampling import sample_and_score
from dcd_megatron.lab.stats import binomial_se, idle_wall_estimate, list_schedule, summarize, verdict
from dcd_megatron.loss import DCDConfig


# ---- task and data ------------------------------------------------------------------------------

@pytest.mark.parametrize("style", list(task.STYLES))
def test_every_style_writes_a_correct_trace_that_the_checkers_accept(style):
    rng = random.Random(style)
    for _ in range(50):
        digits = task.random_digits(rng, rng.randint(2, 12))
        trace = task.make_trace(digits, style)
        assert task.is_correct(digits, trace)
        assert task.first_error(digits, trace) is None
        if len(digits) > task.STYLES[style]:  # the first step holds all of its operands
            assert task.style_of(trace) == style
        wrong = trace[:-1] + str((int(trace[-1]) + 1) % 10)
        assert not task.is_correct(digits, wrong)


def test_style_of_reads_the_first_step():
    assert task.style_of("3+5=8,8+2=10>10") == "verbose"
    assert task.style_of("3+5+2=10>10") == "skip2"
    assert task.style_of("3+5+2+7=17>17") == "skip3"
    assert task.style_of("garbage") == "other"
    # the style-choosing token sits at a fixed response position for single-digit operands
    assert task.make_trace("358", "verbose")[BRANCH_POSITION] == "="
    assert task.make_trace("358", "skip2")[BRANCH_POSITION] == "+"


def test_heldout_problems_are_distinct_and_training_digits_avoid_them():
    problems = labdata.heldout_problems([2, 4, 6], 200, seed=0)
    assert len(problems[2]) == 50  # half of the 100 two-digit strings at most
    assert len(problems[4]) == len(set(problems[4])) == 200
    assert all(len(d) == 6 for d in problems[6])
    exclude = {d for ds in problems.values() for d in ds}
    train = labdata.training_digits(3000, [2, 6], exclude, random.Random(1))
    assert not exclude & set(train)
    assert {len(d) for d in train} == {2, 3, 4, 5, 6}
    again = labdata.heldout_problems([2, 4, 6], 200, seed=0)
    assert again == problems


def test_exact_rows_follow_the_style_weights_and_are_correct():
    rng = random.Random(0)
    digits = labdata.training_digits(2000, [3, 8], set(), rng)
    rows = labdata.exact_rows(digits, {"verbose": 0.5, "skip2": 0.25, "skip3": 0.25}, rng)
    share = sum(r["style"] == "verbose" for r in rows) / len(rows)
    assert 0.45 < share < 0.55
    for r in rows[:200]:
        assert task.is_correct(labdata.digits_of(r["prompt"]), r["response"])
    sample = labdata.style_sample(rows, 7, seed=0)
    assert sorted({r["style"] for r in sample}) == ["skip2", "skip3", "verbose"]
    assert len(sample) == 21


# ---- config and arms --------------------------------------------------------------------------

def test_default_and_tiny_configs_are_valid_and_overridable():
    cfg = LabConfig()
    assert "sft" in cfg.arms and len(cfg.seeds) >= 3
    tiny = tiny_lab_config("/tmp/x")
    changed = apply_overrides(tiny, ["distill.steps=7", "seeds=[4,5]", "arms=[sft,tis]"])
    assert changed.distill.steps == 7 and changed.seeds == [4, 5] and changed.arms == ["sft", "tis"]


@pytest.mark.parametrize("override, field", [
    (["arms=[sigmoid,tis]"], "arms"),
    (["arms=[sft,nope]"], "arms"),
    (["seeds=[1,1]"], "seeds"),
    (["seq_length=40"], "seq_length"),
    (["teacher.k=[5,3]"], "teacher.k"),
    (["student.prior_style=fancy"], "prior_style"),
    (["traces.temperature=0"], "traces.temperature"),
])
def test_bad_settings_name_the_field(override, field):
    with pytest.raises((LabConfigError, ValueError), match=field.replace(".", r"\.")):
        apply_overrides(LabConfig(), override)


def test_seq_length_fits_the_longest_trace():
    # a verbose trace of k nines: "9+9=18," then "18+9=27," ... then ">..."
    digits = "9" * 12
    assert trace_tokens(12) == 1 + len(digits) + 1 + len(task.make_trace(digits, "verbose")) + 1
    assert trace_tokens(12) <= LabConfig().seq_length


def test_every_arm_is_a_valid_loss_and_the_anneal_scales_with_steps():
    for name in ARMS:
        loss = arm_loss(name, 300)
        assert isinstance(loss, DCDConfig)
    anneal = arm_loss("anneal", 300)
    assert anneal.tau_at(0) == pytest.approx(0.5)
    assert anneal.tau_at(150) == pytest.approx(2.0) and anneal.tau_at(300) == pytest.approx(2.0)
    assert anneal.tau_at(75) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="unknown lab arm"):
        arm_loss("bogus", 10)


# ---- the KV-cached model ------------------------------------------------------------------------

def _random_kv(vocab=20, layers=2, hidden=32, heads=4, groups=2, ffn=48, seed=0) -> KVCachedGPT:
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads
    sd = {"embedding.word_embeddings.weight": torch.randn(32, hidden, generator=g),
          "decoder.final_layernorm.weight": 1 + 0.1 * torch.randn(hidden, generator=g),
          "output_layer.weight": torch.randn(32, hidden, generator=g) * 0.3}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        sd[p + "self_attention.linear_qkv.weight"] = torch.randn((heads + 2 * groups) * hd, hidden, generator=g) * 0.3
        sd[p + "self_attention.linear_proj.weight"] = torch.randn(hidden, heads * hd, generator=g) * 0.2
        sd[p + "pre_mlp_layernorm.weight"] = 1 + 0.1 * torch.randn(hidden, generator=g)
        sd[p + "mlp.linear_fc1.weight"] = torch.randn(2 * ffn, hidden, generator=g) * 0.3
        sd[p + "mlp.linear_fc2.weight"] = torch.randn(hidden, ffn, generator=g) * 0.2
    cfg = NetConfig(layers, hidden, heads, groups, ffn)
    model_cfg = type("M", (), dict(
        num_attention_heads=heads, query_groups=groups, kv_channels=None, hidden_size=hidden, norm_epsilon=1e-5,
        num_layers=cfg.num_layers, rotary_percent=1.0, rotary_base=10000.0))
    return KVCachedGPT(sd, model_cfg, vocab)


def test_kv_cached_steps_give_the_full_forward_logits_for_ragged_rows():
    model = _random_kv()
    g = torch.Generator().manual_seed(1)
    full = torch.randint(0, 20, (3, 30), generator=g)
    lengths = [5, 11, 8]
    logits, state = model.prefill([full[i, :n] for i, n in enumerate(lengths)])
    reference = model(full)
    for step in range(15):
        for i, n in enumerate(lengths):
            assert torch.allclose(logits[i], reference[i, n + step - 1], atol=1e-4), (i, step)
        tokens = torch.stack([full[i, n + step] for i, n in enumerate(lengths)])
        logits, state = model.step(state, tokens)
    # dropping a row keeps the others' caches aligned
    keep = torch.tensor([2, 0])
    state = model.select(state, keep)
    tokens = torch.stack([full[i, lengths[i] + 15] for i in keep.tolist()])
    logits, state = model.step(state, tokens)
    for r, i in enumerate(keep.tolist()):
        assert torch.allclose(logits[r], reference[i, lengths[i] + 15], atol=1e-4)


def test_full_forward_is_causal():
    model = _random_kv()
    a = torch.randint(0, 20, (1, 12))
    b = a.clone()
    b[0, 8:] = (b[0, 8:] + 1) % 20
    assert torch.allclose(model(a)[0, :8], model(b)[0, :8], atol=1e-5)
    assert not torch.allclose(model(a)[0, 8:], model(b)[0, 8:], atol=1e-3)


def test_sampled_traces_carry_the_log_probs_of_the_sampling_distribution():
    model = _random_kv(seed=3)
    prompts = [[1, 5, 6], [1, 7], [1, 5, 6, 9, 9]]
    out = sample_and_score(model, prompts, eos_id=2, max_new_tokens=9, temperature=0.7, seed=4)
    again = sample_and_score(model, prompts, eos_id=2, max_new_tokens=9, temperature=0.7, seed=4, batch_size=1)
    assert out == again or all(a[0] == b[0] for a, b in zip(out, again))
    for p, (ids, lps) in zip(prompts, out):
        assert 1 <= len(ids) <= 9 and len(ids) == len(lps)
        seq = torch.tensor([p + ids])
        logp = torch.log_softmax(model(seq)[0] / 0.7, dim=-1)
        for t, (tok, lp) in enumerate(zip(ids, lps)):
            assert lp == pytest.approx(float(logp[len(p) - 1 + t, tok]), abs=1e-4)
    with pytest.raises(ValueError, match="temperature"):
        sample_and_score(model, prompts, eos_id=2, max_new_tokens=3, temperature=0)


# ---- weights by style ---------------------------------------------------------------------------

class _CharTok:
    """The task's character vocabulary without the tokenizers library."""

    def __init__(self):
        self.vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>", *task.ALPHABET])}
        self.bos_id, self.eos_id = 1, 2

    def encode(self, text):
        return [self.vocab[c] for c in text]


def _rows_with_teacher(style_lp: dict[str, float]) -> list[dict]:
    rows = []
    for style, lp in style_lp.items():
        for digits in ("3527", "91822", "4431"):
            resp = task.make_trace(digits, style)
            rows.append({"prompt": task.make_prompt(digits), "response": resp, "style": style,
                         "teacher_logprobs": [lp] * (len(resp) + 1)})
    return rows


def test_token_batch_aligns_teacher_logprobs_with_the_predicted_response_tokens():
    tok = _CharTok()
    row = {"prompt": "35:", "response": "3+5=8>8", "style": "verbose",
           "teacher_logprobs": [-(i + 1) / 10 for i in range(8)]}
    ids, a, mask, branch = token_batch(tok, [row])
    assert ids[0].tolist() == [1, *tok.encode("35:"), *tok.encode("3+5=8>8"), 2]
    start = 4  # BOS + 3 prompt characters
    assert mask[0].tolist() == [0.0] * (start - 1) + [1.0] * 8
    assert a[0, start - 1].item() == pytest.approx(-0.1)  # predicts the first response token
    assert a[0, -1].item() == pytest.approx(-0.8)  # predicts EOS
    assert ids[0, branch[0] + 1].item() == tok.vocab["="]


def test_weights_by_style_single_out_the_style_the_student_finds_unlikely():
    tok = _CharTok()
    vocab = 18

    def uniform(ids):  # every token has log-prob -log(18) under this "student"
        return torch.zeros(*ids.shape, vocab)

    s = -math.log(vocab)
    rows = _rows_with_teacher({"verbose": s, "skip2": s + 3.0})  # teacher far more confident on skip2
    sharp = weights_by_style(uniform, tok, rows, DCDConfig(method="sigmoid", tau=0.5, trajectory=False), step=0)
    assert sharp["verbose"]["mean"] > 1.0 > sharp["skip2"]["mean"]
    # sigma(0) / sigma(-6) relative to each other, whatever the overall normalisation
    assert sharp["verbose"]["mean"] / sharp["skip2"]["mean"] == pytest.approx(0.5 / torch.sigmoid(torch.tensor(-6.0)).item(), rel=1e-4)
    assert sharp["skip2"]["log_ratio_branch"] == pytest.approx(-3.0, abs=1e-5)
    flat = weights_by_style(uniform, tok, rows, DCDConfig(method="sft"), step=0)
    assert flat["verbose"]["mean"] == pytest.approx(1.0) and flat["skip2"]["branch"] == pytest.approx(1.0)


# ---- statistics ---------------------------------------------------------------------------------

def _record(arm, seed, acc_by_k, n=100):
    return {
        "arm": arm, "seed": seed,
        "accuracy": {str(k): {"n": n, "correct": round(a * n), "styles": {"verbose": n}, "correct_by_style": {}}
                     for k, a in acc_by_k.items()},
        "exposure": {"ex_acc_err_pct": 10.0}, "final": {"ce": 0.5, "ess": 0.9},
        "weights_init": {}, "weights_final": {},
    }


def test_idle_estimate_replays_cpu_times_stage_by_stage():
    assert list_schedule([4, 3, 3, 2], 2) == 6  # 4+2 | 3+3
    assert list_schedule([5], 2) == 5 and list_schedule([], 2) == 0
    cpu = {"main_s": 1, "worker_init_s": 2, "teacher_s": 10, "priors_s": [4, 4], "sampling_s": 3, "jobs_s": [5, 5, 5]}
    assert idle_wall_estimate(cpu, 2) == 1 + 2 + 10 + 3 + 10


def test_binomial_se_and_verdict():
    assert binomial_se(100, 200) == pytest.approx(math.sqrt(0.25 / 200))
    assert binomial_se(0, 0) == 0.0
    assert verdict(0.10, 0.02) == "better" and verdict(-0.10, 0.02) == "worse" and verdict(0.03, 0.02) == "tie"


def test_summary_pairs_arms_with_sft_by_seed():
    groups = {"known": [4], "new": [8], "longer": [12]}
    sft = {1: (0.50, 0.30, 0.0), 2: (0.60, 0.20, 0.0), 3: (0.40, 0.25, 0.0)}
    arm = {1: (0.90, 0.30, 0.0), 2: (0.95, 0.22, 0.0), 3: (0.92, 0.20, 0.0)}
    recs = [_record("sft", s, dict(zip((4, 8, 12), v))) for s, v in sft.items()]
    recs += [_record("x", s, dict(zip((4, 8, 12), v))) for s, v in arm.items()]
    out = summarize(recs, ["sft", "x"], groups)
    known = out["x"]["groups"]["known"]
    diffs = [arm[s][0] - sft[s][0] for s in (1, 2, 3)]
    assert known["diff_mean"] == pytest.approx(sum(diffs) / 3)
    mean = sum(diffs) / 3
    assert known["diff_std"] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2))
    assert known["wins"] == 3 and known["pairs"] == 3 and known["verdict"] == "better"
    assert out["x"]["groups"]["new"]["verdict"] == "tie"
    assert out["x"]["prize"] and not out["sft"]["prize"]
    assert out["x"]["ks"]["4"]["mean"] == pytest.approx((0.90 + 0.95 + 0.92) / 3)


# ---- report -------------------------------------------------------------------------------------

def test_report_renders_every_arm_and_small_plots(tmp_path):
    from dcd_megatron.configs import to_dict
    from dcd_megatron.lab.report import write_report

    cfg = tiny_lab_config(str(tmp_path / "out"))
    ks = [*cfg.eval.known_k, *cfg.eval.new_k, *cfg.eval.longer_k]
    recs = []
    for arm in cfg.arms:
        for seed in cfg.seeds:
            rec = _record(arm, seed, dict(zip(ks, (0.5 + 0.1 * seed, 0.3, 0.1))), n=8)
            rec["weights_final"] = rec["weights_init"] = {"verbose": {"mean": 1.2, "branch": 1.5, "log_ratio_branch": 0.1}}
            rec["series"] = {"step": [1, 2], "ce": [1.0, 0.8], "ess": [1.0, 0.9]}
            rec["exposure"].update(max_len=12, prompts=6)
            recs.append(rec)
    ref = {"accuracy": {str(k): {"n": 8, "correct": 4, "styles": {}, "correct_by_style": {}} for k in ks}}
    results = {"lab_id": "test", "config": to_dict(cfg), "records": recs, "references": {"teacher": ref, "prior-seed1": ref},
               "trace_styles": {"verbose": 3}, "sampling": {"drawn": 5, "dropped": {"wrong": 2}},
               "timing": {"total_s": 60.0, "cpus": 2, "workers": 2, "threads_per_worker": 1,
                          "load_before": [0.1, 0, 0], "load_after": [0.2, 0, 0], "stages_s": {"teacher trained": 5.0},
                          "cpu": {"main_s": 6.0, "workers_total_s": 54.0}, "idle_estimate_s": 42.0},
               "teacher": {"checkpoint": "/x/teacher", "reused": True},
               "command": "python benchmarks/drift_lab.py --tiny"}
    path = write_report(results, tmp_path / "docs" / "results.md")
    text = path.read_text()
    for arm in cfg.arms:
        assert f"| {arm} |" in text
    assert "python benchmarks/drift_lab.py --tiny" in text
    assert "not a fresh run" in text and "`/x/teacher`" in text  # a reused teacher is declared
    assert "1.0 CPU-minutes" in text and "**0.7 min**" in text
    pngs = list((tmp_path / "docs" / "img").glob("*.png"))
    assert len(pngs) == 4 and all(0 < p.stat().st_size < 200_000 for p in pngs)
    for p in pngs:
        assert f"img/{p.name}" in text


def test_out_dir_is_only_wiped_when_the_lab_made_it(tmp_path):
    from dcd_megatron.lab.run import MARKER, LabError, prepare_out_dir

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(LabError, match="not made by the drift lab"):
        prepare_out_dir(foreign)
    assert (foreign / "keep.txt").exists()
    ours = tmp_path / "ours"
    prepare_out_dir(ours)
    (ours / "old.txt").write_text("stale")
    prepare_out_dir(ours)
    assert (ours / MARKER).exists() and not (ours / "old.txt").exists()
