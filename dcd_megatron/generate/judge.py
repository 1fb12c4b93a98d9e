"""The correctness filter: a sample is kept iff it ended with the student's eos, re-tokenizes to the
same ids, has an extractable final answer, and the project's grader says it equals the reference.

Every other sample is counted by the first reason it fails (`REASONS`, in the order checked).
Grading runs in a process pool: math-verify's timeout is a SIGALRM, which needs a main thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

KEPT = "kept"
REASONS = ("truncated", "no_eos", "retokenize_mismatch", "ungradable", "wrong")


@dataclass(frozen=True)
class Verdict:
    """One sample's text, extracted answer and fate (`KEPT` or one of `REASONS`)."""

    response: str
    predicted: str | None
    reason: str


def precheck(tokens: Sequence[int], *, tokenizer, eos_id: int, stop_ids: set[int], answer_format: str):
    """(response text, extracted answer, reason or None) before grading: the checks that need no grader."""
    from dcd_megatron.eval.answers import extract_answer

    body = list(tokens)
    ended = bool(body) and body[-1] in stop_ids
    if ended:
        body = body[:-1]
    response = tokenizer.decode(body)
    if not ended:
        return response, None, "truncated"
    if tokens[-1] != eos_id:
        return response, None, "no_eos"  # stopped on another end token (e.g. the teacher's own eos)
    if tokenizer.encode(response) != body:
        return response, None, "retokenize_mismatch"
    predicted = extract_answer(response, answer_format)
    if predicted is None:
        return response, None, "ungradable"
    return response, predicted, None


def _grade_pair(pair: tuple[str, str]) -> bool:
    from dcd_megatron.eval.answers import grade

    return grade(pair[0], pair[1])


def _equal_answers(pred: str, ref: str) -> bool:
    from dcd_megatron.eval.answers import normalize_answer

    try:
        return normalize_answer(pred) == normalize_answer(ref)
    except Exception:  # noqa: BLE001 - best effort, as in grade(): the grader decides then
        return False


class Grader:
    """`grade(predicted, reference)` of many pairs: equal normalised answers here (grade's own first
    test), the rest (math-verify) in a pool of `workers` processes started on first need and kept
    until `close` (0 workers: all here, in the main thread, where math-verify's timeout works)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = None

    def __call__(self, pairs: list[tuple[str, str]]) -> list[bool]:
        out = [_equal_answers(*p) for p in pairs]
        rest = [i for i, ok in enumerate(out) if not ok]
        if not rest:
            return out
        if self.workers == 0:
            graded = [_grade_pair(pairs[i]) for i in rest]
        else:
            graded = list(self._executor().map(_grade_pair, [pairs[i] for i in rest],
                                               chunksize=max(1, len(rest) // (4 * self.workers))))
        for i, ok in zip(rest, graded, strict=True):
            out[i] = ok
        return out

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the parent holds torch's threads, which a fork would copy mid-flight
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def judge(samples: list[Sequence[int]], references: list[str], *, tokenizer, eos_id: int, stop_ids: set[int],
          answer_format: str, grader: Grader) -> list[Verdict]:
    """The verdict of every sample (``references[i]``: sample i's reference answer)."""
    pre = [precheck(t, tokenizer=tokenizer, eos_id=eos_id, stop_ids=stop_ids, answer_format=answer_format)
           for t in samples]
    todo = [i for i, (_, _, reason) in enumerate(pre) if reason is None]
    correct = dict(zip(todo, grader([(pre[i][1], references[i]) for i in todo]), strict=True))
    return [Verdict(resp, pred, reason or (KEPT if correct[i] else "wrong")) for i, (resp, pred, reason) in enumerate(pre)]
