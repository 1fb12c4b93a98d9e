"""Trace rows -> the token ids and positions to score, encoded exactly as training encodes them.

Scoring uses the training pipeline's `RowEncoder` on the row WITHOUT its teacher columns, so
the scored positions are the response tokens plus, when `data.add_eos` is set, the eos that
training appends: the i-th log-prob written belongs to the i-th trained token by construction.
Rows are never truncated here (a truncated response would get too few log-probs): a row longer
than `max_length` is a `too_long` problem (an error, or a counted skip with on_bad_row=skip).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from dcd_megatron.data.config import DataConfig
from dcd_megatron.data.encoding import RowEncoder
from dcd_megatron.data.loading import RAW_JSON_COLUMN
from dcd_megatron.data.tokenizer import Tokenizer
from dcd_megatron.data.validation import FIXES, RowProblem, skip_hint
from dcd_megatron.score.shards import SUMMARY


@dataclass(frozen=True)
class RowToScore:
    """Token ids of one row and the span of positions whose tokens get a teacher log-prob."""

    index: int  # row index in the input dataset
    input_ids: list[int]
    start: int  # first scored position (>= 1: it is predicted from position start - 1)
    count: int  # scored tokens: the response (+ eos when trained)


def teacher_columns(cfg: DataConfig) -> tuple[str, str, str]:
    return cfg.field_teacher_logprobs, cfg.field_teacher_topk_ids, cfg.field_teacher_topk_logprobs


def scored_columns(cfg: DataConfig, reference: bool) -> tuple[str, ...]:
    """The columns a scoring run (re)writes: the teacher's, or (``--reference``) the initial student's."""
    if reference:
        return cfg.field_student_ref_logprobs, cfg.field_student_ref_checkpoint
    return teacher_columns(cfg)


class ScoringEncoder:
    """Row dict -> `RowToScore` or a `RowProblem`, with the student's data settings."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, max_length: int, reference: bool = False):
        strict = dataclasses.replace(cfg, seq_length=max_length, on_long_row="error")
        self.encoder = RowEncoder(strict, tokenizer)
        # a reference scoring keeps the teacher's columns: its log-probs then cover the same tokens
        self.drop = set(scored_columns(cfg, reference))
        self.max_length = max_length

    def __call__(self, index: int, row: dict) -> RowToScore | RowProblem:
        if RAW_JSON_COLUMN in row:
            row = json.loads(row[RAW_JSON_COLUMN])
        row = {k: v for k, v in row.items() if k not in self.drop}
        encoded = self.encoder.encode(row)
        if isinstance(encoded, RowProblem) and encoded.reason == "too_long":  # name scoring's limit, not training's
            return RowProblem("too_long", encoded.detail.replace(
                f"data.seq_length={self.max_length}", f"the scoring limit --max-length={self.max_length}"))
        if isinstance(encoded, RowProblem):
            return encoded
        if encoded.response_start < 1:
            return RowProblem(
                "empty_prompt",
                "the prompt encodes to no tokens, so the first response token has no context to be "
                "scored from; set data.add_bos=true or give the row a prompt",
            )
        return RowToScore(index, encoded.input_ids, encoded.response_start, encoded.n_trained)


def problem_fix(reason: str, out_dir: Path) -> str:
    """The fix a dcd-score bad-row error names; skipped rows are counted in OUT/score_summary.json."""
    where = f"{out_dir / SUMMARY}"
    if reason == "too_long":
        return ("raise --max-length (at most the teacher's max_position_embeddings; scoring never truncates), "
                f"or {skip_hint(where)}")
    return f"{FIXES.get(reason, 'fix the row')}; or {skip_hint(where)}"


def plan_batches(rows: list[RowToScore], batch_tokens: int) -> list[list[RowToScore]]:
    """Group rows (longest first, to waste little padding) so that rows x longest <= batch_tokens."""
    batches: list[list[RowToScore]] = []
    current: list[RowToScore] = []
    for row in sorted(rows, key=lambda r: (-len(r.input_ids), r.index)):
        longest = len(current[0].input_ids) if current else len(row.input_ids)
        if current and (len(current) + 1) * longest > batch_tokens:
            batches.append(current)
            current = []
        current.append(row)
    if current:
        batches.append(current)
    return batches
