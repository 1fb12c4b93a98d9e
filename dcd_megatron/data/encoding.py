"""Turn one trace row into token ids, a response start, aligned teacher log-probs, or a problem.

The chat template renders only the prompt side; the response is tokenized ALONE and appended,
so the i-th teacher log-prob belongs to the i-th response token exactly. The appended eos is
trained only when it has a known teacher log-prob or the row has none at all (see docs/data.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from dcd_megatron.data.config import DataConfig, DataConfigError
from dcd_megatron.data.loading import RAW_JSON_COLUMN
from dcd_megatron.data.templates import TemplateError, render_prompt
from dcd_megatron.data.tokenizer import Tokenizer
from dcd_megatron.data.tokenizer import TokenizerError
from dcd_megatron.data.validation import RowProblem, check_logprob_column, check_messages, check_topk

_NO_TEACHER = np.zeros(0, dtype=np.float32)  # same arrow type as real rows (float32), never double
_NO_TOPK_IDS = np.zeros(0, dtype=np.int32)


def output_features(count_fields: list[str]):
    """The fixed `datasets.Features` of `RowEncoder` output (same for every source file)."""
    import datasets

    seq = getattr(datasets, "List", None) or datasets.Sequence
    feats = {
        "input_ids": seq(datasets.Value("int32")),
        "teacher": seq(datasets.Value("float32")),
        "reference": seq(datasets.Value("float32")),  # the initial student's log-probs, aligned like teacher
        "response_start": datasets.Value("int32"),
        "n_trained": datasets.Value("int32"),
        "reason": datasets.Value("string"),
        "detail": datasets.Value("string"),
        "truncated_tokens": datasets.Value("int32"),
        "has_teacher": datasets.Value("bool"),
        "has_reference": datasets.Value("bool"),
        "has_topk": datasets.Value("bool"),
        "eos_untrained": datasets.Value("bool"),
        "chars": datasets.Value("int64"),  # characters encoded (prompt as rendered, response)
        "unknown_chars": datasets.Value("int64"),  # of those, encoded as the tokenizer's unknown token
        # data.topk > 0: k entries per input token, flattened (-1 / NaN where unknown)
        "topk_ids": seq(datasets.Value("int32")),
        "topk_logprobs": seq(datasets.Value("float32")),
    }
    for name in count_fields:
        feats[f"meta::{name}"] = datasets.Value("string")
    return datasets.Features(feats)


@dataclass
class EncodedRow:
    """A usable document: ``input_ids = prompt + response (+ eos)``, trained on ``[response_start, +n_trained)``."""

    input_ids: list[int]
    response_start: int
    n_trained: int
    teacher: np.ndarray | None  # float32 aligned to input_ids, NaN where unknown; None: row has none
    reference: np.ndarray | None = None  # the initial student's log-probs, aligned as teacher
    truncated_tokens: int = 0
    has_topk: bool = False
    eos_untrained: bool = False
    topk_ids: np.ndarray | None = None  # [len(input_ids), data.topk] int32, -1 where unknown
    topk_logprobs: np.ndarray | None = None  # same shape, float32, NaN where unknown
    chars: int = 0  # characters encoded (the rendered prompt and the response)
    unknown_chars: int = 0  # of those, encoded as the tokenizer's unknown token


class _Problem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.problem = RowProblem(reason, detail)


class RowEncoder:
    """Picklable row -> dict function for `datasets.map` (one row at a time)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer):
        if cfg.add_eos and tokenizer.eos_id is None:
            raise DataConfigError(
                "data.add_eos=true but the tokenizer defines no eos token; set data.add_eos=false "
                "or use a tokenizer with one (for tokenizer.json: an eos_token in tokenizer_config.json)"
            )
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = cfg.template_text()
        self.bos_text = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
        self.eos_text = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""

    # ---- the map function ----------------------------------------------------------------
    def __call__(self, row: dict) -> dict:
        if RAW_JSON_COLUMN in row:  # a JSONL file read line by line (see loading.py)
            row = json.loads(row[RAW_JSON_COLUMN])
        out = {
            "input_ids": [], "teacher": _NO_TEACHER, "reference": _NO_TEACHER, "response_start": 0, "n_trained": 0,
            "reason": "", "detail": "", "truncated_tokens": 0,
            "has_teacher": False, "has_reference": False, "has_topk": False, "eos_untrained": False,
            "topk_ids": _NO_TOPK_IDS, "topk_logprobs": _NO_TEACHER, "chars": 0, "unknown_chars": 0,
        }
        for name in self.cfg.counted_fields():
            value = row.get(name)
            out[f"meta::{name}"] = "" if value is None else str(value)
        result = self.encode(row)
        if isinstance(result, RowProblem):
            out["reason"], out["detail"] = result.reason, result.detail
            return out
        out.update(
            input_ids=result.input_ids,
            teacher=_NO_TEACHER if result.teacher is None else result.teacher,
            reference=_NO_TEACHER if result.reference is None else result.reference,
            response_start=result.response_start,
            n_trained=result.n_trained,
            truncated_tokens=result.truncated_tokens,
            has_teacher=result.teacher is not None,
            has_reference=result.reference is not None,
            has_topk=result.has_topk,
            eos_untrained=result.eos_untrained,
            chars=result.chars,
            unknown_chars=result.unknown_chars,
        )
        if result.topk_ids is not None:
            out.update(topk_ids=result.topk_ids.reshape(-1), topk_logprobs=result.topk_logprobs.reshape(-1))
        return out

    def encode(self, row: dict) -> EncodedRow | RowProblem:
        """Encode one row, or say why it cannot be used."""
        try:
            return self._encode(row)
        except _Problem as p:
            return p.problem

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids exactly as training encodes them (template, BOS): for generation."""
        try:
            return self._prompt_ids(messages)[0]
        except _Problem as p:
            raise TokenizerError(f"cannot encode the prompt: {p.problem.detail}") from None

    # ---- steps ---------------------------------------------------------------------------
    def _aligned_topk(self, ids, logprobs, n_ids: int, start: int, n_resp: int, eos_trained: bool):
        """[n_ids, k] teacher top-k ids / log-probs aligned to the input tokens (-1 / NaN elsewhere)."""
        k = self.cfg.topk
        out_ids = np.full((n_ids, k), -1, dtype=np.int32)
        out_lp = np.full((n_ids, k), np.nan, dtype=np.float32)
        positions = n_resp + int(eos_trained and len(ids) > n_resp)
        for i in range(positions):
            row_ids, row_lp = ids[i], logprobs[i]
            if len(row_ids) < k:
                raise _Problem(
                    "topk_mismatch",
                    f"position {i} has {len(row_ids)} top-k entries, fewer than data.topk={k}",
                )
            target = start + i if i < n_resp else n_ids - 1  # values were checked by check_topk
            out_ids[target] = np.asarray(row_ids[:k], dtype=np.int64)
            out_lp[target] = np.asarray(row_lp[:k], dtype=np.float64)
        return out_ids, out_lp

    def _split_prompt_response(self, row: dict) -> tuple[list[dict], str]:
        cfg = self.cfg
        messages = row.get(cfg.field_messages)
        prompt = row.get(cfg.field_prompt)
        response = row.get(cfg.field_response)
        if messages is not None:
            problem = check_messages(messages)
            if problem:
                raise _Problem(problem.reason, problem.detail)
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
            if response is None:
                if not messages or messages[-1]["role"] != "assistant":
                    raise _Problem(
                        "missing_field",
                        f"no {cfg.field_response!r} field and the last message is not from the assistant",
                    )
                response = messages[-1]["content"]
                messages = messages[:-1]
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise _Problem("wrong_type", f"{cfg.field_prompt} must be a string, got {type(prompt).__name__}")
            messages = [{"role": "user", "content": prompt}]
        else:
            raise _Problem(
                "missing_field",
                f"needs a {cfg.field_prompt!r} string or a {cfg.field_messages!r} list",
            )
        if response is None:
            raise _Problem("missing_field", f"no {cfg.field_response!r} field")
        if not isinstance(response, str):
            raise _Problem("wrong_type", f"{cfg.field_response} must be a string, got {type(response).__name__}")
        if not response.strip():
            raise _Problem("empty_response", "the response is empty")
        return messages, response

    def _prompt_ids(self, messages: list[dict]) -> tuple[list[int], int, int]:
        """The prompt's ids, its characters and how many of them became the unknown token."""
        tok = self.tokenizer
        try:
            text = render_prompt(self.template, messages, bos_token=self.bos_text, eos_token=self.eos_text)
        except TemplateError as exc:
            raise _Problem("template_error", str(exc)) from None
        ids, unknown = tok.encode_counting_unknown(text) if text else ([], 0)
        if self.cfg.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id, *ids]
        return ids, len(text), unknown

    def _logprob_column(self, row: dict, name: str, n: int) -> np.ndarray | None:
        """The checked per-response-token log-probs of column ``name`` (None when the row has none)."""
        raw = row.get(name)
        if raw is None:
            return None
        values, problem = check_logprob_column(name, raw, n, self.cfg.add_eos)
        if problem:
            raise _Problem(problem.reason, problem.detail)
        return values

    def _encode(self, row: dict) -> EncodedRow:
        cfg, tok = self.cfg, self.tokenizer
        messages, response = self._split_prompt_response(row)
        prompt_ids, prompt_chars, prompt_unknown = self._prompt_ids(messages)
        resp_ids, resp_unknown = tok.encode_counting_unknown(response)
        if not resp_ids:
            raise _Problem("empty_response", "the response tokenizes to no tokens")
        n = len(resp_ids)

        teacher = self._logprob_column(row, cfg.field_teacher_logprobs, n)
        reference = self._logprob_column(row, cfg.field_student_ref_logprobs, n)
        if teacher is not None and reference is not None and len(teacher) != len(reference):
            raise _Problem("logprob_count_mismatch", f"{len(reference)} {cfg.field_student_ref_logprobs} values but "
                           f"{len(teacher)} {cfg.field_teacher_logprobs}: score both over the same tokens")
        topk_ids = row.get(cfg.field_teacher_topk_ids)
        topk_lp = row.get(cfg.field_teacher_topk_logprobs)
        problem = check_topk(topk_ids, topk_lp, n, cfg.add_eos, tok.vocab_size)
        if problem:
            raise _Problem(problem.reason, problem.detail)

        with_eos = cfg.add_eos
        eos_trained = with_eos and all(c is None or len(c) == n + 1 for c in (teacher, reference))
        total = len(prompt_ids) + n + int(with_eos)
        truncated = 0
        if total > cfg.seq_length:
            if cfg.on_long_row != "truncate":
                raise _Problem("too_long", f"{total} tokens > data.seq_length={cfg.seq_length}")
            keep = cfg.seq_length - len(prompt_ids)
            if keep < 1:
                raise _Problem(
                    "prompt_too_long",
                    f"the prompt alone is {len(prompt_ids)} tokens, leaving no room for the response "
                    f"in data.seq_length={cfg.seq_length}",
                )
            # Cut the response end; a cut response has no eos (it did not end there).
            truncated = total - cfg.seq_length
            resp_ids = resp_ids[:keep]
            with_eos = eos_trained = False
            teacher = None if teacher is None else teacher[:keep]
            reference = None if reference is None else reference[:keep]
            if topk_ids is not None:
                topk_ids, topk_lp = topk_ids[:keep], topk_lp[:keep]

        ids = [*prompt_ids, *resp_ids]
        if with_eos:
            ids.append(tok.eos_id)
        n_resp = len(resp_ids)
        top_ids = top_lp = None
        if cfg.topk and topk_ids is not None:
            top_ids, top_lp = self._aligned_topk(topk_ids, topk_lp, len(ids), len(prompt_ids), n_resp, eos_trained)
        return EncodedRow(
            input_ids=ids,
            topk_ids=top_ids,
            topk_logprobs=top_lp,
            response_start=len(prompt_ids),
            n_trained=n_resp + int(eos_trained),
            teacher=_aligned(teacher, len(ids), len(prompt_ids), n_resp, eos_trained),
            reference=_aligned(reference, len(ids), len(prompt_ids), n_resp, eos_trained),
            truncated_tokens=truncated,
            has_topk=topk_ids is not None,
            eos_untrained=with_eos and not eos_trained,
            chars=prompt_chars + len(response),
            unknown_chars=prompt_unknown + resp_unknown,
        )


def _aligned(values: np.ndarray | None, n_ids: int, start: int, n_resp: int, eos_trained: bool) -> np.ndarray | None:
    """Per-response-token ``values`` as float32 aligned to the input ids (NaN elsewhere; the eos's last)."""
    if values is None:
        return None
    out = np.full(n_ids, np.nan, dtype=np.float32)
    out[start : start + n_resp] = values[:n_resp]
    if eos_trained:
        out[-1] = values[n_resp]
    return out
