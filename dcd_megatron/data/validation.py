"""Per-row checks of trace rows: each failure is a (reason, detail) pair that names the fix.

``on_bad_row=error`` turns the first failure into a `BadRowError` (file, row, reason, fix);
``on_bad_row=skip`` counts failures per reason into the cache's ``meta.json``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dcd_megatron.errors import UserError

POSITIVE_LOGPROB_TOLERANCE = 1e-4

# reason -> what the user should do about it
FIXES: dict[str, str] = {
    "missing_field": "add the field, or point data.field_* at the column that holds it",
    "wrong_type": "fix the row's field type (see the trace schema in docs/data.md)",
    "empty_response": "drop rows with empty responses",
    "logprob_count_mismatch": (
        "recompute teacher log-probs with the STUDENT tokenizer on the response alone "
        "(one per response token, optionally one more for eos when data.add_eos=true)"
    ),
    "nonfinite_logprob": "replace NaN/inf teacher log-probs (re-score the trace)",
    "positive_logprob": "store log-probabilities (<= 0), not probabilities or logits",
    "topk_mismatch": "give teacher_topk_ids and teacher_topk_logprobs one k-list per response token",
    "template_error": "fix data.chat_template for this row's messages",
    "invalid_json": "fix or remove the malformed line",
    "too_long": "set data.on_long_row=truncate (cuts the response end) or skip, or raise data.seq_length",
    "prompt_too_long": "raise data.seq_length or shorten the prompt (truncation only cuts responses)",
}

TOKEN_CACHE_RECORD = "the token cache's meta.json"


def skip_hint(counted_in: str = TOKEN_CACHE_RECORD) -> str:
    """How to skip bad rows instead, and where the skipped rows are counted."""
    return f"set data.on_bad_row=skip to skip such rows (they are counted in {counted_in})"


SKIP_HINT = skip_hint()


class BadRowError(UserError, ValueError):
    """A trace row (numbered from 1) failed a check under ``on_bad_row=error`` (or ``on_long_row=error``)."""

    def __init__(self, source: str, row: int, reason: str, detail: str, fix: str | None = None,
                 counted_in: str = TOKEN_CACHE_RECORD):
        self.source, self.row, self.reason, self.detail = source, row, reason, detail
        if fix is None:
            fix = FIXES.get(reason, "fix the row")
            if reason not in ("too_long",):
                fix = f"{fix}; or {skip_hint(counted_in)}"
        self.fix = fix
        super().__init__(f"{source}: row {row}: {reason}: {detail}. Fix: {fix}")

    def __reduce__(self):
        return (BadRowError, (self.source, self.row, self.reason, self.detail, self.fix))


@dataclass(frozen=True)
class RowProblem:
    """Why a row cannot be used: a reason key (see `FIXES`) and a human-readable detail."""

    reason: str
    detail: str


@dataclass
class SkipCounts:
    """Rows skipped per reason, with the first few examples for the log."""

    by_reason: Counter
    examples: dict[str, str]

    @classmethod
    def empty(cls) -> SkipCounts:
        return cls(Counter(), {})

    def add(self, reason: str, where: str, detail: str, n: int = 1) -> None:
        self.by_reason[reason] += n
        self.examples.setdefault(reason, f"{where}: {detail}")

    def merge(self, other: SkipCounts) -> None:
        self.by_reason.update(other.by_reason)
        for reason, example in other.examples.items():
            self.examples.setdefault(reason, example)

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.by_reason.items()))


def _is_str(x) -> bool:
    return isinstance(x, str)


def check_messages(messages) -> RowProblem | None:
    """A chat list of {role: str, content: str} dicts."""
    if not isinstance(messages, (list, tuple)):
        return RowProblem("wrong_type", f"messages must be a list of {{role, content}}, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not _is_str(m.get("role")) or not _is_str(m.get("content")):
            return RowProblem("wrong_type", f"messages[{i}] must be {{role: str, content: str}}, got {m!r:.80}")
    return None


def _numbers(values, name: str) -> tuple[np.ndarray | None, RowProblem | None]:
    """A float64 array of ``values``, or the first element that is not a number (bools excluded)."""
    if not isinstance(values, (list, tuple, np.ndarray)):
        return None, RowProblem("wrong_type", f"{name} must be a list of floats, got {type(values).__name__}")
    try:
        arr = np.asarray(values)
    except ValueError:  # ragged nesting
        arr = np.asarray(values, dtype=object)
    if arr.ndim == 1 and (arr.dtype.kind in "fi" or len(arr) == 0):
        return arr.astype(np.float64), None
    for i, v in enumerate(values):  # slow path only to name the culprit
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None, RowProblem("wrong_type", f"{name}[{i}] must be a float, got {v!r:.40}")
    return np.asarray(values, dtype=np.float64), None


def allowed_counts(n_response_tokens: int, add_eos: bool) -> tuple[int, ...]:
    """Accepted teacher log-prob counts: one per response token, plus optionally one for eos."""
    return (n_response_tokens, n_response_tokens + 1) if add_eos else (n_response_tokens,)


def check_teacher_logprobs(values, n_response_tokens: int, add_eos: bool) -> tuple[np.ndarray | None, RowProblem | None]:
    """Types, count against the student-tokenized response, finiteness and sign."""
    logprobs, problem = _numbers(values, "teacher_logprobs")
    if problem:
        return None, problem
    allowed = allowed_counts(n_response_tokens, add_eos)
    if len(logprobs) not in allowed:
        extra = f" ({n_response_tokens + 1} with eos)" if add_eos else ""
        return None, RowProblem(
            "logprob_count_mismatch",
            f"{len(logprobs)} teacher log-probs but the response tokenizes to {n_response_tokens} "
            f"student tokens{extra}",
        )
    bad = np.flatnonzero(~np.isfinite(logprobs))
    if len(bad):
        return None, RowProblem("nonfinite_logprob", f"teacher_logprobs[{bad[0]}] = {logprobs[bad[0]]}")
    if len(logprobs) and logprobs.max() > POSITIVE_LOGPROB_TOLERANCE:
        i = int(logprobs.argmax())
        return None, RowProblem(
            "positive_logprob", f"teacher_logprobs[{i}] = {logprobs[i]:.4g} > 0 is not a log-probability"
        )
    return logprobs, None


def check_topk(ids, logprobs, n_response_tokens: int, add_eos: bool) -> RowProblem | None:
    """Top-k ids and log-probs: both or neither, one k-list per response token, same shapes."""
    if ids is None and logprobs is None:
        return None
    if ids is None or logprobs is None:
        return RowProblem("topk_mismatch", "teacher_topk_ids and teacher_topk_logprobs must come together")
    if not isinstance(ids, Sequence) or not isinstance(logprobs, Sequence) or isinstance(ids, str):
        return RowProblem("wrong_type", "teacher_topk_ids / teacher_topk_logprobs must be lists of lists")
    allowed = allowed_counts(n_response_tokens, add_eos)
    if len(ids) not in allowed or len(logprobs) != len(ids):
        return RowProblem(
            "topk_mismatch",
            f"{len(ids)} top-k id lists and {len(logprobs)} log-prob lists for {n_response_tokens} "
            "response tokens",
        )
    for i, (a, b) in enumerate(zip(ids, logprobs)):
        if not isinstance(a, Sequence) or not isinstance(b, Sequence) or len(a) != len(b):
            return RowProblem("topk_mismatch", f"position {i}: top-k ids and log-probs differ in length")
    return _topk_element_types(ids, logprobs)


def _kind(values) -> str:
    """numpy's dtype kind of a (possibly ragged) nested list; "O" when it mixes types or nests unevenly."""
    try:
        return np.asarray(values).dtype.kind
    except ValueError:  # ragged: positions with different k
        return "O"


def _topk_element_types(ids, logprobs) -> RowProblem | None:
    """Integer ids and numeric log-probs: a string such as "-0.5" is refused, never converted."""
    id_kind, lp_kind = _kind(ids), _kind(logprobs)
    if id_kind in "iu" and lp_kind in "fiu" and all(len(a) for a in ids):
        return None
    for i, (a, b) in enumerate(zip(ids, logprobs)):
        for j, v in enumerate(a):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                return RowProblem("wrong_type", f"teacher_topk_ids[{i}][{j}] must be an integer, got {v!r:.40}")
        for j, v in enumerate(b):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                return RowProblem("wrong_type", f"teacher_topk_logprobs[{i}][{j}] must be a float, got {v!r:.40}")
    return None
