"""Per-row checks of trace rows: each failure is a (reason, detail) pair that names the fix.

``on_bad_row=error`` turns the first failure into a `BadRowError` (file, row, reason, fix);
``on_bad_row=skip`` counts failures per reason into the cache's ``meta.json``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

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
    "nonfinite_logprob": "replace NaN/inf log-probs (re-score the trace)",
    "positive_logprob": "store log-probabilities (<= 0), not probabilities or logits",
    "topk_id_out_of_range": "store the student tokenizer's token ids (re-score the trace with dcd-score --top-k), -1 only as padding",
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


_BOOL_TYPES = frozenset((bool, np.bool_))
TOPK_PADDING_ID = -1  # a top-k id of -1 pads a position's list (its log-prob is not checked)


def _has_bool(values) -> bool:
    """Whether a flat list holds a boolean (numpy would read ``True`` as 1 and ``False`` as 0.0)."""
    if isinstance(values, np.ndarray):
        return values.dtype.kind == "b"
    return not _BOOL_TYPES.isdisjoint(map(type, values))


def _is_number(v, integer: bool = False) -> bool:
    """A real number (an integer when ``integer``); booleans are never numbers."""
    if isinstance(v, (bool, np.bool_)):
        return False
    return isinstance(v, (int, np.integer) if integer else (int, float, np.integer, np.floating))


def _numbers(values, name: str) -> tuple[np.ndarray | None, RowProblem | None]:
    """A float64 array of ``values``, or the first element that is not a number (bools excluded)."""
    if not isinstance(values, (list, tuple, np.ndarray)):
        return None, RowProblem("wrong_type", f"{name} must be a list of floats, got {type(values).__name__}")
    try:
        arr = np.asarray(values)
    except ValueError:  # ragged nesting
        arr = np.asarray(values, dtype=object)
    if arr.ndim == 1 and (len(arr) == 0 or (arr.dtype.kind in "fi" and not _has_bool(values))):
        return arr.astype(np.float64), None
    for i, v in enumerate(values):  # slow path only to name the culprit
        if not _is_number(v):
            return None, RowProblem("wrong_type", f"{name}[{i}] must be a float, got {v!r:.40}")
    return np.asarray(values, dtype=np.float64), None


def allowed_counts(n_response_tokens: int, add_eos: bool) -> tuple[int, ...]:
    """Accepted per-token log-prob counts: one per response token, plus optionally one for eos."""
    return (n_response_tokens, n_response_tokens + 1) if add_eos else (n_response_tokens,)


def check_logprob_values(values: np.ndarray, name: str, where=None) -> RowProblem | None:
    """The rule every log-prob obeys: finite and <= 0 (up to ``POSITIVE_LOGPROB_TOLERANCE`` of rounding).

    ``where(i)`` names element ``i`` of the flat ``values`` (default ``name[i]``).
    """
    where = where or (lambda i: f"{name}[{i}]")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        return RowProblem("nonfinite_logprob", f"{where(int(bad[0]))} = {values[bad[0]]}")
    if len(values) and values.max() > POSITIVE_LOGPROB_TOLERANCE:
        i = int(values.argmax())
        return RowProblem("positive_logprob", f"{where(i)} = {values[i]:.4g} > 0 is not a log-probability")
    return None


def check_logprob_column(name: str, values, n_response_tokens: int, add_eos: bool) -> tuple[np.ndarray | None, RowProblem | None]:
    """A per-token log-prob column (e.g. ``teacher_logprobs``): numbers, one per response token
    (plus one for eos), each finite and <= 0. Any such column is checked by this one function."""
    logprobs, problem = _numbers(values, name)
    if problem:
        return None, problem
    allowed = allowed_counts(n_response_tokens, add_eos)
    if len(logprobs) not in allowed:
        extra = f" ({n_response_tokens + 1} with eos)" if add_eos else ""
        what = "teacher log-probs" if name == "teacher_logprobs" else f"{name} values"
        return None, RowProblem(
            "logprob_count_mismatch",
            f"{len(logprobs)} {what} but the response tokenizes to {n_response_tokens} student tokens{extra}",
        )
    problem = check_logprob_values(logprobs, name)
    return (None, problem) if problem else (logprobs, None)


def check_topk(ids, logprobs, n_response_tokens: int, add_eos: bool, vocab_size: int | None = None) -> RowProblem | None:
    """Top-k ids and log-probs: both or neither, one k-list per response token, same shapes;
    ids are integers, -1 (padding) or in ``[0, vocab_size)``; log-probs of real ids finite and <= 0."""
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
    return _topk_element_types(ids, logprobs) or _topk_values(ids, logprobs, vocab_size)


def _types_ok(nested, integer: bool) -> bool:
    """Whether every element of a list of lists is a number (an integer when ``integer``), no boolean."""
    allowed = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    types = set(map(type, chain.from_iterable(nested)))
    return _BOOL_TYPES.isdisjoint(types) and all(issubclass(t, allowed) for t in types)


def _topk_element_types(ids, logprobs) -> RowProblem | None:
    """Integer ids and numeric log-probs: a string such as "-0.5" is refused, never converted; a boolean too."""
    if _types_ok(ids, integer=True) and _types_ok(logprobs, integer=False):
        return None
    for i, (a, b) in enumerate(zip(ids, logprobs)):  # slow path only to name the culprit
        for j, v in enumerate(a):
            if not _is_number(v, integer=True):
                return RowProblem("wrong_type", f"teacher_topk_ids[{i}][{j}] must be an integer, got {v!r:.40}")
        for j, v in enumerate(b):
            if not _is_number(v):
                return RowProblem("wrong_type", f"teacher_topk_logprobs[{i}][{j}] must be a float, got {v!r:.40}")
    return None


def _topk_values(ids, logprobs, vocab_size: int | None) -> RowProblem | None:
    """Ids in range (or -1 padding) and `check_logprob_values` on the log-probs of the real ids."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    starts = np.concatenate([[0], np.cumsum(lengths)])
    flat_ids = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(starts[-1]))
    flat_lp = np.fromiter(chain.from_iterable(logprobs), dtype=np.float64, count=int(starts[-1]))

    def where(name):
        def at(k: int) -> str:
            i = int(np.searchsorted(starts, k, side="right")) - 1
            return f"{name}[{i}][{k - starts[i]}]"
        return at

    high = np.inf if vocab_size is None else vocab_size
    bad = np.flatnonzero((flat_ids < TOPK_PADDING_ID) | (flat_ids >= high))
    if len(bad):
        vocab = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
        return RowProblem(
            "topk_id_out_of_range",
            f"{where('teacher_topk_ids')(int(bad[0]))} = {flat_ids[bad[0]]} is neither -1 (padding) nor a token id {vocab}",
        )
    real = flat_ids != TOPK_PADDING_ID
    lp = np.where(real, flat_lp, -1.0)  # padding's log-prob is not checked
    return check_logprob_values(lp, "teacher_topk_logprobs", where("teacher_topk_logprobs"))
