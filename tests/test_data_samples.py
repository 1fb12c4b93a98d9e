"""Token cache to micro-batches: packing, label alignment, resumable DP batching, CP layout, masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dcd_megatron.data import (
    DataConfig,
    MicroBatchIterator,
    PackedSamples,
    TokenCache,
    ValidationIterator,
    build_token_cache,
    holdout_split,
    load_tokenizer,
    load_trace_data,
    merge_context_parallel,
    packed_causal_mask,
    plan_samples,
    split_for_context_parallel,
    train_sentencepiece,
)
from dcd_megatron.data.masks import cu_seqlens_from_segments
from dcd_megatron.data.packing import PackingError

SEQ = 48


def _response(i: int) -> str:
    return " ".join(f"step {k} gives {i * k}" for k in range(1 + i % 4))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A cache of 24 rows; odd rows carry teacher log-probs equal to -(index of the response token)."""
    root = tmp_path_factory.mktemp("samples")
    corpus = [f"what is {i} times k? " + _response(i) for i in range(40)]
    tok = load_tokenizer(train_sentencepiece(corpus, root / "sp"))
    rows = []
    for i in range(24):
        row = {"prompt": f"what is {i} times k?", "response": _response(i)}
        if i % 2:
            n = len(tok.encode(row["response"]))
            row["teacher_logprobs"] = [-float(j) for j in range(n)] + [-float(n)]  # eos included
        rows.append(row)
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train_path=str(path), tokenizer=str(root / "sp"), seq_length=SEQ, cache_dir=str(root / "cache"), num_proc=1)
    cache = TokenCache.open(build_token_cache(str(path), cfg, tok))
    return {"cfg": cfg, "tok": tok, "rows": rows, "cache": cache}


def test_plan_is_next_fit_greedy_and_refuses_long_documents():
    np.testing.assert_array_equal(plan_samples(np.array([3, 4, 2, 5, 1]), 8, pack=True), [0, 2, 5])
    np.testing.assert_array_equal(plan_samples(np.array([8, 1, 7, 8]), 8, pack=True), [0, 1, 3, 4])
    np.testing.assert_array_equal(plan_samples(np.array([3, 4]), 8, pack=False), [0, 1, 2])
    with pytest.raises(PackingError, match="exceeds seq_length=8"):
        plan_samples(np.array([3, 9]), 8, pack=True)


def test_packed_samples_keep_documents_whole_with_reset_positions(world):
    cache, tok = world["cache"], world["tok"]
    samples = PackedSamples(cache, SEQ, pack=True)
    assert len(samples) < cache.n_docs  # several documents per sample
    seen = []
    for i in range(len(samples)):
        s = samples[i]
        assert all(v.shape == (SEQ,) for v in s.values())
        seg = s["segment_ids"]
        n_docs = int(seg.max()) + 1
        real = seg >= 0
        np.testing.assert_array_equal(seg[real], np.repeat(np.arange(n_docs), np.bincount(seg[real])))
        assert not real[int(real.sum()):].any()  # padding only at the end
        pad = ~real
        assert (s["tokens"][pad] == tok.pad_id).all() and (s["loss_mask"][pad] == 0).all()
        for d, doc in zip(range(n_docs), samples.docs_of(i)):
            pos = np.flatnonzero(seg == d)
            a, b = cache.doc_offsets[doc], cache.doc_offsets[doc + 1]
            np.testing.assert_array_equal(s["tokens"][pos], cache.tokens[a:b])  # whole document
            np.testing.assert_array_equal(s["position_ids"][pos], np.arange(b - a))
            np.testing.assert_array_equal(s["labels"][pos[:-1]], cache.tokens[a + 1 : b])
            assert s["loss_mask"][pos[-1]] == 0  # the last token predicts nothing of its document
            seen.append(int(doc))
    assert seen == list(range(cache.n_docs))
    single = PackedSamples(cache, SEQ, pack=False)
    assert len(single) == cache.n_docs and all(single[i]["segment_ids"].max() == 0 for i in range(3))
    assert 0 < samples.stats.fill <= 1 and samples.stats.fill > single.stats.fill


def test_teacher_logprobs_and_response_frac_line_up_with_labels(world):
    cache, tok, rows = world["cache"], world["tok"], world["rows"]
    samples = PackedSamples(cache, SEQ, pack=True)
    checked = 0
    for i in range(len(samples)):
        s = samples[i]
        for d, doc in enumerate(samples.docs_of(i)):
            row = rows[int(cache.doc_rows[doc])]
            resp = tok.encode(row["response"]) + [tok.eos_id]  # eos is trained in every row here
            pos = np.flatnonzero((s["segment_ids"] == d) & (s["loss_mask"] > 0))
            assert len(pos) == len(resp)
            np.testing.assert_array_equal(s["labels"][pos], resp)
            np.testing.assert_allclose(s["response_frac"][pos], np.arange(len(resp)) / len(resp), rtol=1e-6)
            if "teacher_logprobs" in row:  # log-prob j sits where response token j is the label
                np.testing.assert_array_equal(s["teacher_logprobs"][pos], -np.arange(len(resp), dtype=np.float32))
                checked += 1
            else:
                assert np.isnan(s["teacher_logprobs"][pos]).all()
            # prompt labels: untrained, frac 0
            prompt = np.flatnonzero((s["segment_ids"] == d) & (s["loss_mask"] == 0))
            assert (s["response_frac"][prompt] == 0).all()
    assert checked == 12
    assert (samples[0]["response_frac"] < 1).all()


def test_micro_batches_resume_and_split_across_dp(world):
    samples = PackedSamples(world["cache"], SEQ, pack=False)  # 24 samples
    kw = dict(micro_batch_size=2, num_microbatches=2, seed=7)
    it = MicroBatchIterator(samples, dp_rank=0, dp_size=1, **kw)
    assert it.samples_per_epoch == 24 and it.global_batch_size == 4
    first = [next(it) for _ in range(9)]  # 18 of 24 samples; the next 10 cross into epoch 1
    state = it.state_dict()
    assert state == {"consumed_samples": 18}
    more = [next(it) for _ in range(10)]
    resumed = MicroBatchIterator(samples, dp_rank=0, dp_size=1, consumed_samples=18, **kw)
    for a, b in zip(more, [next(resumed) for _ in range(10)]):
        for key in a:
            torch.testing.assert_close(a[key], b[key], equal_nan=True)
    b0 = first[0]
    assert b0["tokens"].shape == (2, SEQ) and b0["tokens"].dtype == torch.int64
    assert b0["loss_mask"].dtype == torch.float32 and b0["segment_ids"].dtype == torch.int64
    # an epoch visits every sample once; the next epoch reshuffles
    order0, order1 = it.epoch_order(0).copy(), it.epoch_order(1).copy()
    assert sorted(order0) == list(range(24)) and not np.array_equal(order0, order1)
    # DP: per global batch, the ranks' micro-batches are disjoint and cover it
    ranks = [MicroBatchIterator(samples, dp_rank=r, dp_size=2, **kw) for r in range(2)]
    got = [np.concatenate([rk.next_indices() for _ in range(2)]) for rk in ranks]
    assert set(got[0]).isdisjoint(got[1])
    assert sorted(np.concatenate(got)) == sorted(ranks[0].epoch_order(0)[:8])
    assert ranks[0].consumed_samples == 8
    # the same data position means the same global samples whatever dp_size resumes it
    solo = MicroBatchIterator(samples, dp_rank=0, dp_size=1, consumed_samples=8, **kw)
    duo = [MicroBatchIterator(samples, dp_rank=r, dp_size=2, consumed_samples=8, **kw).next_indices() for r in range(2)]
    assert sorted(np.concatenate([solo.next_indices(), solo.next_indices()])) == sorted(np.concatenate(duo))
    with pytest.raises(ValueError, match="multiple of micro_batch_size x dp_size"):
        MicroBatchIterator(samples, dp_rank=0, dp_size=2, consumed_samples=3, **kw)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        MicroBatchIterator(samples, dp_rank=0, dp_size=4, micro_batch_size=4, num_microbatches=2, seed=0)


def test_validation_iterator_is_finite_fixed_and_padded(world):
    samples = PackedSamples(world["cache"], SEQ, pack=False)  # 24 samples, 2 ranks x 5 -> 3 steps
    passes = [list(ValidationIterator(samples, micro_batch_size=5, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(passes[0]) == len(passes[1]) == 3
    again = list(ValidationIterator(samples, micro_batch_size=5, dp_rank=0, dp_size=2))
    torch.testing.assert_close(again[2]["tokens"], passes[0][2]["tokens"])
    real = sum(int((b["segment_ids"][:, 0] >= 0).sum()) for p in passes for b in p)
    trained = sum(float(b["loss_mask"].sum()) for p in passes for b in p)
    assert real == 24
    assert trained == pytest.approx(sum(float(samples[i]["loss_mask"].sum()) for i in range(24)))


def test_holdout_split_is_deterministic_and_stable(world):
    rows = np.arange(100)
    train, valid = holdout_split(rows, 0.1)
    assert len(valid) == 10 and set(train).isdisjoint(valid) and len(train) + len(valid) == 100
    again = holdout_split(rows, 0.1)[1]
    np.testing.assert_array_equal(valid, again)
    kept = rows[rows % 7 != 3]  # rows dropped (skipped) do not move the others between splits
    _, valid_kept = holdout_split(kept, 0.1)
    assert len(set(kept[valid_kept]) & set(rows[valid])) >= 7
    cfg = world["cfg"]
    data = load_trace_data(
        DataConfig(**{**cfg.__dict__, "valid_fraction": 0.25}), world["tok"], build=False
    )
    train_docs = {int(d) for i in range(len(data.train)) for d in data.train.docs_of(i)}
    valid_docs = {int(d) for i in range(len(data.valid)) for d in data.valid.docs_of(i)}
    assert len(valid_docs) == 6 and train_docs.isdisjoint(valid_docs) and len(train_docs | valid_docs) == 24
    # a separate validation file gets its own cache; train keeps every document
    valid_file = cfg.cache_dir + "/../valid.jsonl"
    with open(valid_file, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in world["rows"][:5])
    data = load_trace_data(DataConfig(**{**cfg.__dict__, "valid_path": valid_file, "pack": False}), world["tok"])
    assert (len(data.train), len(data.valid), data.valid_meta["kept"]) == (24, 5, 5)
    np.testing.assert_array_equal(data.valid[0]["tokens"], data.train[0]["tokens"])


def test_context_parallel_split_layout_and_round_trip():
    b, s = 2, 16
    batch = {
        "tokens": torch.arange(b * s).reshape(b, s),
        "loss_mask": torch.rand(b, s),
        "attention_mask": packed_causal_mask(torch.zeros(b, s, dtype=torch.long)),
        "note": "kept",
    }
    for cp in (1, 2, 4):
        parts = [split_for_context_parallel(batch, r, cp) for r in range(cp)]
        for r, part in enumerate(parts):
            assert part["tokens"].shape == (b, s // cp) and part["attention_mask"].shape == (b, 1, s // cp, s)
            chunk = s // (2 * cp)
            want = list(range(r * chunk, (r + 1) * chunk)) + list(range((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk))
            assert part["tokens"][0].tolist() == want
        merged = merge_context_parallel(parts, cp)
        for key in ("tokens", "loss_mask", "attention_mask"):
            assert torch.equal(merged[key], batch[key])
        assert merged["note"] == "kept"
    with pytest.raises(ValueError, match="divisible by 2 x cp_size"):
        split_for_context_parallel({"tokens": torch.zeros(1, 10)}, 0, 4)


def test_packed_mask_is_block_diagonal_causal():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [0, 0, 0, 0, 0, 0, 0, 0]])
    mask = packed_causal_mask(seg)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    for b in range(2):
        for i in range(8):
            for j in range(8):
                si, sj = int(seg[b, i]), int(seg[b, j])
                visible = (si == sj and si >= 0 and j <= i) or i == j  # padding sees only itself
                assert bool(mask[b, 0, i, j]) == (not visible), (b, i, j)
    assert cu_seqlens_from_segments(seg[:1]).tolist() == [0, 3, 5, 6, 8]
    assert cu_seqlens_from_segments(torch.tensor([[0, 0, 1, 1]])).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="micro_batch_size=1"):
        cu_seqlens_from_segments(seg)
    with pytest.raises(ValueError, match="padding"):
        cu_seqlens_from_segments(torch.tensor([[0, -1, 1, 1]]))


def test_teacher_top_k_lines_up_with_labels_and_flows_into_batches(tmp_path):
    """Row j's top-k at response position t is [label, label+1, ...] with log-probs -t - [0, 1, ...]."""
    corpus = [f"what is {i} times k? " + _response(i) for i in range(40)]
    tok = load_tokenizer(train_sentencepiece(corpus, tmp_path / "sp"))
    k = 3
    rows = []
    for i in range(10):
        row = {"prompt": f"what is {i} times k?", "response": _response(i)}
        if i % 3:  # some rows without top-k: their positions stay unknown (-1 / NaN)
            resp = tok.encode(row["response"]) + [tok.eos_id]
            row["teacher_topk_ids"] = [[(t + j) % tok.vocab_size for j in range(k + 1)] for t in resp]
            row["teacher_topk_logprobs"] = [[-float(p) - j for j in range(k + 1)] for p in range(len(resp))]
        rows.append(row)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train_path=str(path), tokenizer=str(tmp_path / "sp"), seq_length=SEQ,
                     cache_dir=str(tmp_path / "cache"), num_proc=1, topk=k)
    cache = TokenCache.open(build_token_cache(str(path), cfg, tok))
    assert cache.teacher_topk_ids.shape == (len(cache.tokens), k)
    samples = PackedSamples(cache, SEQ, pack=True)
    with_topk = 0
    for i in range(len(samples)):
        s = samples[i]
        assert s["teacher_topk_ids"].shape == (SEQ, k)
        for d, doc in enumerate(samples.docs_of(i)):
            row = rows[int(cache.doc_rows[doc])]
            pos = np.flatnonzero((s["segment_ids"] == d) & (s["loss_mask"] > 0))
            ids, lps = s["teacher_topk_ids"][pos], s["teacher_topk_logprobs"][pos]
            if "teacher_topk_ids" in row:  # only the first k of the k+1 given entries are kept
                np.testing.assert_array_equal(ids, (s["labels"][pos, None] + np.arange(k)) % tok.vocab_size)
                np.testing.assert_array_equal(lps, -np.arange(len(pos))[:, None] - np.arange(k, dtype=np.float32))
                with_topk += 1
            else:
                assert (ids == -1).all() and np.isnan(lps).all()
            untrained = np.flatnonzero((s["segment_ids"] == d) & (s["loss_mask"] == 0))
            assert (s["teacher_topk_ids"][untrained] == -1).all()
    assert with_topk == 6
    batch = samples.batch([0, -1])
    assert batch["teacher_topk_ids"].shape == (2, SEQ, k)
    assert (batch["teacher_topk_ids"][1] == -1).all()
