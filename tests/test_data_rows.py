"""Trace rows to token cache: tokenizers, templates, loading formats, bad-row policy, cache keying."""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest

from dcd_megatron.configs import apply_overrides
from dcd_megatron.data import (
    BadRowError,
    CacheError,
    DataConfig,
    DataConfigError,
    DataLoadError,
    TokenCache,
    TokenizerError,
    build_hf_tokenizer,
    build_token_cache,
    load_rows,
    load_tokenizer,
    require_same_vocabulary,
    train_sentencepiece,
)
from dcd_megatron.data import cache as cache_mod
from dcd_megatron.data.loading import resolve_sources

CORPUS = [f"question {i}: what is {i} plus {i + 1}? answer {2 * i + 1}, so the sum is {2 * i + 1}" for i in range(60)]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    sp = train_sentencepiece(CORPUS, root / "sp")
    hf = build_hf_tokenizer(CORPUS, root / "hf")
    return {"sp": sp, "hf": hf}


@pytest.fixture(scope="module")
def sp(tok_dirs):
    return load_tokenizer(tok_dirs["sp"])


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def make_cfg(tmp_path, train_path, tokenizer, **kw):
    kw.setdefault("seq_length", 64)
    # the tiny tokenizers know only CORPUS's characters; the unknown-character limit has its own
    # tests (tests/test_reliability_input.py)
    kw.setdefault("max_unknown_char_frac", 1.0)
    return DataConfig(train_path=str(train_path), tokenizer=str(tokenizer), cache_dir=str(tmp_path / "cache"), num_proc=1, **kw)


def build(cfg, tok):
    return TokenCache.open(build_token_cache(cfg.train_path, cfg, tok))


def docs_of(cache):
    """Each cached document as (tokens, loss_mask, teacher, response_start)."""
    out = []
    for d in range(cache.n_docs):
        a, b = cache.doc_offsets[d], cache.doc_offsets[d + 1]
        out.append((list(cache.tokens[a:b]), list(cache.loss_mask[a:b]), np.array(cache.teacher_logprobs[a:b]), int(cache.response_start[d])))
    return out


def good_rows(tok, n=6):
    rows = []
    for i in range(n):
        resp = f"answer {2 * i + 1}, so the sum is {2 * i + 1}"
        row = {"prompt": f"question {i}: what is {i} plus {i + 1}?", "response": resp, "style": "short" if i % 2 else "long"}
        if i % 3 == 0:
            row["teacher_logprobs"] = [-0.5] * len(tok.encode(resp))
        rows.append(row)
    return rows


# ---- tokenizers and config ------------------------------------------------------------------


def test_tokenizers_load_roundtrip_pickle_and_fingerprint(tok_dirs, tmp_path):
    sp = load_tokenizer(tok_dirs["sp"])
    sp_dir = load_tokenizer(tok_dirs["sp"].parent)  # directory holding a .model
    hf = load_tokenizer(tok_dirs["hf"].parent, "auto")  # directory holding tokenizer.json
    assert (sp.kind, sp_dir.kind, hf.kind) == ("sentencepiece", "sentencepiece", "hf")
    assert (sp.eos_id, sp.bos_id, sp.pad_id) == (2, 1, 3)  # set by train_sentencepiece
    vocab = hf._tok.get_vocab()
    assert (hf.eos_id, hf.bos_id, hf.pad_id) == (vocab["</s>"], vocab["<s>"], vocab["<pad>"])
    text = "what is 7 plus 8? answer 15"
    for tok in (sp, hf):
        ids = tok.encode(text)
        assert ids and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.encode(text) == ids and clone.fingerprint == tok.fingerprint
    assert sp_dir.fingerprint == sp.fingerprint
    assert hf.fingerprint != sp.fingerprint
    require_same_vocabulary(sp, sp_dir)
    with pytest.raises(TokenizerError, match="STUDENT tokenizer"):
        require_same_vocabulary(sp, hf)
    # without tokenizer_config.json the specials are guessed from their names
    bare = build_hf_tokenizer(CORPUS[:5], tmp_path / "bare", with_config=False)
    assert load_tokenizer(bare).eos_id == load_tokenizer(bare)._tok.token_to_id("</s>")
    with pytest.raises(TokenizerError, match="data.tokenizer"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="without tokenizer.json"):
        load_tokenizer(tok_dirs["sp"].parent, "hf")


def test_config_errors_name_the_field(tmp_path):
    cases = {
        "data.seq_length": dict(seq_length=1),
        "data.valid_fraction": dict(valid_fraction=1.5),
        "data.valid_path and data.valid_fraction": dict(valid_path="v.jsonl", valid_fraction=0.1),
        "data.chat_template": dict(chat_template="vicuna"),
        "data.num_proc": dict(num_proc=0),
    }
    for field, kw in cases.items():
        with pytest.raises(DataConfigError, match=field.replace(".", r"\.")):
            DataConfig(**kw)
    with pytest.raises(DataConfigError, match="does not compile"):
        DataConfig(chat_template="{% for m in messages %}")
    with pytest.raises(DataConfigError, match="data.train_path is empty"):
        DataConfig().require_sources()
    cfg = apply_overrides(DataConfig(), ["on_bad_row=skip", "chat_template=chatml", "seq_length=128"])
    assert (cfg.on_bad_row, cfg.seq_length) == ("skip", 128)
    assert "<|im_start|>assistant" in cfg.template_text()
    assert DataConfig(num_proc=None).resolved_num_proc() in range(1, 5)


# ---- formats, messages, templates -----------------------------------------------------------


def test_jsonl_parquet_and_saved_dataset_give_the_same_cache(tmp_path, sp, tok_dirs):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = good_rows(sp)
    jsonl = write_jsonl(tmp_path / "t.jsonl", rows)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "t.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "saved"))
    caches = [build(make_cfg(tmp_path, p, tok_dirs["sp"]), sp) for p in (jsonl, tmp_path / "t.parquet", tmp_path / "saved")]
    for c in caches[1:]:
        np.testing.assert_array_equal(c.tokens, caches[0].tokens)
        np.testing.assert_array_equal(c.loss_mask, caches[0].loss_mask)
        np.testing.assert_array_equal(c.teacher_logprobs, caches[0].teacher_logprobs)
    meta = caches[0].meta
    assert (meta["rows"], meta["kept"], meta["skipped"]) == (6, 6, {})
    assert meta["counts"]["style"] == {"long": 3, "short": 3}
    assert meta["has_teacher_logprobs_fraction"] == pytest.approx(2 / 6)
    # each document is [bos] + encode(prompt) + encode(response) + [eos], trained on the response + eos
    for (tokens, mask, _teacher, rs), row in zip(docs_of(caches[0]), rows):
        prompt_ids = [sp.bos_id, *sp.encode(row["prompt"])]
        resp_ids = sp.encode(row["response"])
        assert tokens == prompt_ids + resp_ids + [sp.eos_id]
        assert rs == len(prompt_ids)
        assert mask == [0] * rs + [1] * len(resp_ids) + [0 if "teacher_logprobs" in row else 1]


def test_directory_and_glob_of_files_with_different_columns(tmp_path, sp, tok_dirs):
    rows = good_rows(sp, 4)
    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{k: v for k, v in r.items() if k != "teacher_logprobs"} for r in rows[:2]])
    write_jsonl(d / "b.jsonl", rows[2:])
    for path in (d, d / "*.jsonl"):
        cache = build(make_cfg(tmp_path, path, tok_dirs["sp"]), sp)
        assert cache.meta["kept"] == 4 and cache.meta["source"]["files"] == [str(d / "a.jsonl"), str(d / "b.jsonl")]
        assert list(cache.doc_rows) == [0, 1, 2, 3]
    assert resolve_sources("org/some-dataset").kind == "hub"  # not a path: a name for datasets
    with pytest.raises(DataLoadError, match="does not exist"):
        resolve_sources(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataLoadError, match="matches no"):
        resolve_sources(str(d / "*.parquet"))
    ds = load_rows(str(d / "b.jsonl"), DataConfig(field_response="response"), cache_dir=tmp_path / "c2")
    assert ds.num_rows == 2 and "response" in ds.column_names


def test_messages_rows_with_chatml_and_custom_jinja(tmp_path, sp, tok_dirs):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 1 plus 2?"}]
    rows = [
        {"messages": msgs + [{"role": "assistant", "content": "answer 3"}]},  # final message = response
        {"messages": msgs, "response": "answer 3"},
    ]
    jsonl = write_jsonl(tmp_path / "m.jsonl", rows)
    cache = build(make_cfg(tmp_path, jsonl, tok_dirs["sp"], chat_template="chatml"), sp)
    expected_prompt = (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nwhat is 1 plus 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    want = [sp.bos_id, *sp.encode(expected_prompt), *sp.encode("answer 3"), sp.eos_id]
    docs = docs_of(cache)
    assert docs[0][0] == want and docs[1][0] == want
    custom = "{% for m in messages %}[{{ m.role | upper }}] {{ m.content }} {% endfor %}=>"
    cache = build(make_cfg(tmp_path, jsonl, tok_dirs["sp"], chat_template=custom, add_bos=False), sp)
    assert docs_of(cache)[0][0][: -len(sp.encode("answer 3")) - 1] == sp.encode(
        "[SYSTEM] be brief [USER] what is 1 plus 2? =>"
    )


# ---- bad rows -------------------------------------------------------------------------------

BAD_ROWS = {
    "missing_field": {"prompt": "what is 1 plus 2?"},
    "wrong_type": {"prompt": "what is 1 plus 2?", "response": 3},
    "empty_response": {"prompt": "what is 1 plus 2?", "response": "  "},
    "logprob_count_mismatch": {"prompt": "q", "response": "answer 3", "teacher_logprobs": [-0.1] * 40},
    "nonfinite_logprob": {"prompt": "q", "response": "answer 3", "teacher_logprobs": "NAN"},
    "positive_logprob": {"prompt": "q", "response": "answer 3", "teacher_logprobs": "POS"},
    "topk_mismatch": {"prompt": "q", "response": "answer 3", "teacher_topk_ids": [[1, 2]], "teacher_topk_logprobs": [[-1.0]]},
    "template_error": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer 3"}]},
    "invalid_json": '{"prompt": "q", "response": ',
    "prompt_too_long": {"prompt": "what is 1 plus 2? " * 30, "response": "answer 3"},
}


def _materialize(row, tok):
    """Fill the placeholders that depend on the response token count."""
    if isinstance(row, dict) and isinstance(row.get("teacher_logprobs"), str):
        n = len(tok.encode(row["response"]))
        value = float("nan") if row["teacher_logprobs"] == "NAN" else 0.3
        row = {**row, "teacher_logprobs": [-0.2] * (n - 1) + [value]}
    return row


def test_each_bad_row_kind_errors_with_row_and_reason_or_is_counted(tmp_path, sp, tok_dirs):
    good = good_rows(sp, 3)
    # this template needs two prompt messages: the template_error row has one
    two = "{{ messages[0].content }} / {{ messages[1].content }}"
    pair = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    for reason, row in BAD_ROWS.items():
        rows = [*good[:2], _materialize(row, sp), good[2]]
        kw = {}
        if reason == "template_error":
            rows = [{"messages": pair, "response": r["response"]} if i != 2 else r for i, r in enumerate(rows)]
            kw = {"chat_template": two}
        path = write_jsonl(tmp_path / f"{reason}.jsonl", rows)
        with pytest.raises(BadRowError) as info:
            build(make_cfg(tmp_path, path, tok_dirs["sp"], **kw), sp)
        err = info.value
        assert (err.reason, err.row, err.source) == (reason, 3, str(path)), str(err)
        assert f"row 3: {reason}" in str(err) and str(path) in str(err)
        assert "data.on_bad_row=skip" in str(err)
        cache = build(make_cfg(tmp_path, path, tok_dirs["sp"], on_bad_row="skip", **kw), sp)
        assert cache.meta["skipped"] == {reason: 1}, (reason, cache.meta["skipped"])
        assert (cache.meta["rows"], cache.meta["kept"]) == (4, 3)
        assert list(cache.doc_rows) == [0, 1, 3]


def test_long_rows_truncate_the_response_end_or_skip_or_error(tmp_path, sp, tok_dirs):
    long_resp = " ".join(f"answer {i}" for i in range(40))
    n = len(sp.encode(long_resp))
    rows = [
        {"prompt": "what is 1 plus 2?", "response": long_resp, "teacher_logprobs": [-(j + 1) / 100 for j in range(n)]},
        {"prompt": "q", "response": "answer 3"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    cache = build(make_cfg(tmp_path, path, tok_dirs["sp"], seq_length=32), sp)
    prompt_len = 1 + len(sp.encode(rows[0]["prompt"]))
    keep = 32 - prompt_len
    tokens, mask, teacher, rs = docs_of(cache)[0]
    assert len(tokens) == 32 and sp.eos_id not in tokens[rs:]  # cut responses get no eos
    assert tokens[rs:] == sp.encode(long_resp)[:keep]
    np.testing.assert_allclose(teacher[rs:], [-(j + 1) / 100 for j in range(keep)], rtol=1e-6)
    assert (cache.meta["truncated"], cache.meta["truncated_tokens"]) == (1, prompt_len + n + 1 - 32)
    skip = build(make_cfg(tmp_path, path, tok_dirs["sp"], seq_length=32, on_long_row="skip", on_bad_row="error"), sp)
    assert (skip.meta["kept"], skip.meta["skipped"]) == (1, {"too_long": 1})
    with pytest.raises(BadRowError, match="row 1: too_long.*data.seq_length"):
        build(make_cfg(tmp_path, path, tok_dirs["sp"], seq_length=32, on_long_row="error", on_bad_row="skip"), sp)


def test_eos_is_trained_only_with_a_known_teacher_logprob(tmp_path, sp, tok_dirs):
    resp = "answer 7"
    n = len(sp.encode(resp))
    rows = [
        {"prompt": "q", "response": resp, "teacher_logprobs": [-0.25] * n},  # eos log-prob unknown
        {"prompt": "q", "response": resp, "teacher_logprobs": [-0.25] * n + [-0.75],  # includes eos
         "teacher_topk_ids": [[1, 2]] * (n + 1), "teacher_topk_logprobs": [[-0.1, -2.0]] * (n + 1)},
        {"prompt": "q", "response": resp},  # no teacher: plain SFT row, eos trained
    ]
    cache = build(make_cfg(tmp_path, write_jsonl(tmp_path / "eos.jsonl", rows), tok_dirs["sp"]), sp)
    (t0, m0, a0, _), (t1, m1, a1, _), (t2, m2, a2, _) = docs_of(cache)
    assert t0[-1] == t1[-1] == t2[-1] == sp.eos_id
    assert (m0[-1], m1[-1], m2[-1]) == (0, 1, 1)
    assert math.isnan(a0[-1]) and a1[-1] == pytest.approx(-0.75) and np.isnan(a2).all()
    for mask, teacher in ((m0, a0), (m1, a1)):  # a row with log-probs never trains a NaN-teacher token
        assert np.isfinite(teacher[np.asarray(mask) == 1]).all()
    assert cache.meta["eos_untrained"] == 1
    assert cache.meta["has_teacher_topk_fraction"] == pytest.approx(1 / 3)
    bad = build(make_cfg(tmp_path, tmp_path / "eos.jsonl", tok_dirs["sp"], add_eos=False, on_bad_row="skip"), sp)
    assert bad.meta["skipped"] == {"logprob_count_mismatch": 1}  # n+1 log-probs without an eos


def test_initial_student_logprobs_are_cached_beside_the_teachers_with_their_scorer(tmp_path, sp, tok_dirs):
    resp = "answer 7"
    n = len(sp.encode(resp))
    rows = [
        {"prompt": "q", "response": resp, "teacher_logprobs": [-0.25] * (n + 1),
         "student_ref_logprobs": [-0.5] * n + [-1.5], "student_ref_checkpoint": "iter_0000010@abc"},
        {"prompt": "q", "response": resp, "teacher_logprobs": [-0.25] * (n + 1)},  # no reference
        {"prompt": "q", "response": resp, "teacher_logprobs": [-0.25] * n,  # eos untrained: both cover n
         "student_ref_logprobs": [-0.5] * n, "student_ref_checkpoint": "iter_0000010@abc"},
    ]
    cache = build(make_cfg(tmp_path, write_jsonl(tmp_path / "ref.jsonl", rows), tok_dirs["sp"]), sp)
    spans = [(cache.doc_offsets[d], cache.doc_offsets[d + 1]) for d in range(cache.n_docs)]
    ref = [np.array(cache.student_ref_logprobs[a:b]) for a, b in spans]
    mask = [np.array(cache.loss_mask[a:b]) for a, b in spans]
    assert ref[0][-1] == pytest.approx(-1.5) and np.all(ref[0][mask[0] == 1] <= -0.5)  # aligned as the teacher's
    assert np.isnan(ref[1]).all() and np.isnan(ref[0][mask[0] == 0]).all()
    assert mask[2][-1] == 0 and np.isfinite(ref[2][mask[2] == 1]).all()
    assert cache.meta["has_student_ref_logprobs_fraction"] == pytest.approx(2 / 3)
    assert cache.meta["counts"]["student_ref_checkpoint"] == {"iter_0000010@abc": 2}  # what setup checks
    # a reference over other tokens than the teacher's is refused by row, like a teacher count mismatch
    write_jsonl(tmp_path / "bad.jsonl", [dict(rows[0], student_ref_logprobs=[-0.5] * n)])
    with pytest.raises(BadRowError, match="student_ref_logprobs values but .* teacher_logprobs"):
        build(make_cfg(tmp_path, tmp_path / "bad.jsonl", tok_dirs["sp"]), sp)
    write_jsonl(tmp_path / "pos.jsonl", [dict(rows[1], student_ref_logprobs=[0.5] * (n + 1))])
    with pytest.raises(BadRowError, match=r"student_ref_logprobs\[0\] = 0.5 > 0"):
        build(make_cfg(tmp_path, tmp_path / "pos.jsonl", tok_dirs["sp"]), sp)


# ---- the cache ------------------------------------------------------------------------------


def test_cache_is_reused_keyed_and_atomic(tmp_path, sp, tok_dirs, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", good_rows(sp))
    cfg = make_cfg(tmp_path, path, tok_dirs["sp"])
    root = cfg.resolved_cache_dir()
    root.mkdir(parents=True)
    final_name = cache_mod.token_cache_path(str(path), cfg, sp).name
    leftover = root / f".tmp-{final_name}-999-deadbeef"  # a crashed builder's half-written directory
    leftover.mkdir()
    np.save(leftover / "tokens.npy", np.zeros(3, np.int32))
    (root / final_name).mkdir()  # an incomplete directory under the final name (no meta.json)
    with pytest.raises(CacheError, match="no complete token cache"):
        TokenCache.open(root / final_name)
    first = build_token_cache(str(path), cfg, sp)
    assert first.name == final_name and TokenCache.open(first).meta["kept"] == 6
    assert not any(p.name.startswith(".tmp-") and p != leftover for p in root.iterdir())

    def boom(*a, **k):
        raise AssertionError("re-tokenized although a complete cache exists")

    monkeypatch.setattr(cache_mod, "_tokenize_sources", boom)
    assert build_token_cache(str(path), cfg, sp) == first  # reused
    assert build_token_cache(str(path), make_cfg(tmp_path, path, tok_dirs["sp"], shuffle=False, pack=False), sp) == first
    with pytest.raises(AssertionError, match="re-tokenized"):  # a setting that changes tokens -> new key
        build_token_cache(str(path), make_cfg(tmp_path, path, tok_dirs["sp"], add_bos=False), sp)
    os.utime(path, ns=(1, 1))  # the data changed (mtime)
    with pytest.raises(AssertionError, match="re-tokenized"):
        build_token_cache(str(path), cfg, sp)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(("hf-", ".tmp-"))) == [final_name]


def test_parallel_tokenization_matches_serial(tmp_path, tok_dirs):
    hf = load_tokenizer(tok_dirs["hf"])
    rows = [{"prompt": f"what is {i} plus {i}?", "response": f"answer {2 * i}"} for i in range(130)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    serial = build(make_cfg(tmp_path / "s", path, tok_dirs["hf"]), hf)
    cfg = DataConfig(train_path=str(path), tokenizer=str(tok_dirs["hf"]), cache_dir=str(tmp_path / "p"), num_proc=2, seq_length=64)
    parallel = build(cfg, hf)
    np.testing.assert_array_equal(parallel.tokens, serial.tokens)
    np.testing.assert_array_equal(parallel.doc_offsets, serial.doc_offsets)
    assert parallel.tokens.dtype == np.int32 and parallel.loss_mask.dtype == np.uint8
    assert parallel.teacher_logprobs.dtype == np.float32 and parallel.doc_offsets.dtype == np.int64
    assert isinstance(parallel.tokens, np.memmap)
