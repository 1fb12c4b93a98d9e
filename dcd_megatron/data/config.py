"""`DataConfig`: where the traces are, how to tokenize them and how to cut them into samples."""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dcd_megatron.errors import UserError

BUILTIN_TEMPLATES = ("plain", "chatml", "llama3")


class DataConfigError(UserError, ValueError):
    """A data.* setting is invalid; the message names the field and the fix."""


@dataclass
class DataConfig:
    """Trace data settings (the ``data`` section of a training config).

    ``train_path``/``tokenizer`` may stay empty at construction (a default config) and are
    checked where data is first loaded (`require_sources`).
    """

    train_path: str = ""  # JSONL/Parquet file, glob or directory, a save_to_disk dir, or a datasets name
    valid_path: str | None = None  # held-out traces for validation loss (or use valid_fraction)
    valid_fraction: float = 0.0  # share of train documents held out (by a hash of the row), if no valid_path
    split: str = "train"  # the split to read when train_path is a datasets name
    tokenizer: str = ""  # a SentencePiece .model, a Hugging Face tokenizer.json, or a directory holding one
    tokenizer_type: Literal["auto", "sentencepiece", "hf"] = "auto"  # auto = by file name
    chat_template: str = "plain"  # plain, chatml, llama3, or a Jinja template string (prompt side only)
    seq_length: int = 2048  # tokens per packed training sample
    pack: bool = True  # pack several documents per sample (attention stays inside each)
    on_bad_row: Literal["error", "skip"] = "error"  # a malformed row stops the run, or is skipped and counted
    on_long_row: Literal["truncate", "skip", "error"] = "truncate"  # rows longer than seq_length (truncation cuts the response end)
    max_unknown_char_frac: float = 0.001  # largest share of a data path's characters the tokenizer may turn into its unknown token (above: refused)
    cache_dir: str | None = None  # token cache location (null = <train.output_dir>/cache)
    num_proc: int | None = None  # tokenization worker processes (null = min(4, cpus))
    add_eos: bool = True  # append the tokenizer's end-of-text after each response
    add_bos: bool = True  # start each prompt with the tokenizer's BOS (when it has one)
    shuffle: bool = True  # reshuffle samples every epoch (seeded by train.seed)
    field_prompt: str = "prompt"  # column names in the trace rows:
    field_messages: str = "messages"  # column holding the messages
    field_response: str = "response"  # column holding the response
    field_teacher_logprobs: str = "teacher_logprobs"  # column holding the teacher logprobs
    field_student_ref_logprobs: str = "student_ref_logprobs"  # column holding the initial student's logprobs (loss.reference=initial)
    field_student_ref_checkpoint: str = "student_ref_checkpoint"  # column naming the checkpoint that scored them
    field_teacher_topk_ids: str = "teacher_topk_ids"  # column holding the teacher topk ids
    field_teacher_topk_logprobs: str = "teacher_topk_logprobs"  # column holding the teacher topk logprobs
    field_answer: str = "answer"  # column holding the answer
    topk: int = 0  # teacher top-k entries kept per token (for loss.term=topk_kl); 0 = don't store them
    count_fields: list[str] = field(default_factory=lambda: ["style"])  # metadata columns whose values are counted in the cache metadata

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks run at construction; call again after changing fields in place."""
        if not isinstance(self.seq_length, int) or self.seq_length < 2:
            raise DataConfigError(
                f"data.seq_length={self.seq_length!r}: needs an integer >= 2 (tokens per sample)"
            )
        if not 0.0 <= float(self.valid_fraction) < 1.0:
            raise DataConfigError(
                f"data.valid_fraction={self.valid_fraction!r}: needs a number in [0, 1), "
                "e.g. data.valid_fraction=0.01"
            )
        if self.valid_path and self.valid_fraction > 0:
            raise DataConfigError(
                "data.valid_path and data.valid_fraction are both set: use one "
                "(data.valid_fraction=0 to use the valid file, or data.valid_path=null to hold out)"
            )
        if self.tokenizer_type not in ("auto", "sentencepiece", "hf"):
            raise DataConfigError(
                f"data.tokenizer_type={self.tokenizer_type!r}: use auto, sentencepiece or hf"
            )
        if self.on_bad_row not in ("error", "skip"):
            raise DataConfigError(f"data.on_bad_row={self.on_bad_row!r}: use error or skip")
        if self.on_long_row not in ("truncate", "skip", "error"):
            raise DataConfigError(
                f"data.on_long_row={self.on_long_row!r}: use truncate, skip or error"
            )
        if isinstance(self.max_unknown_char_frac, bool) or not 0.0 <= float(self.max_unknown_char_frac) <= 1.0:
            raise DataConfigError(
                f"data.max_unknown_char_frac={self.max_unknown_char_frac!r}: needs a number in [0, 1], "
                "e.g. 0.001 (0 refuses any character the tokenizer cannot encode, 1 accepts all)"
            )
        if self.num_proc is not None and (not isinstance(self.num_proc, int) or self.num_proc < 1):
            raise DataConfigError(
                f"data.num_proc={self.num_proc!r}: needs a positive integer, or null for min(4, cpus)"
            )
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 0:
            raise DataConfigError(
                f"data.topk={self.topk!r}: needs an integer >= 0 (teacher top-k entries per token; 0 = none)"
            )
        if not self.split:
            raise DataConfigError("data.split is empty: name the split to read, e.g. data.split=train")
        from dcd_megatron.data.templates import TemplateError, check_template

        try:
            check_template(self.template_text())
        except TemplateError as exc:
            raise DataConfigError(f"data.chat_template: {exc}") from None
        for name in (
            "field_prompt", "field_messages", "field_response", "field_teacher_logprobs",
            "field_student_ref_logprobs", "field_student_ref_checkpoint", "field_teacher_topk_ids", "field_teacher_topk_logprobs", "field_answer",
        ):
            if not getattr(self, name):
                raise DataConfigError(f"data.{name} is empty: give the column name it reads")

    # ---- derived values ----------------------------------------------------------------
    def counted_fields(self) -> list[str]:
        """The metadata columns whose values the cache counts: ``count_fields`` and the column naming
        the checkpoint that scored ``student_ref_logprobs`` (a run checks it against its init checkpoint)."""
        return list(dict.fromkeys([*self.count_fields, self.field_student_ref_checkpoint]))

    def resolved_num_proc(self) -> int:
        """Tokenization workers: ``num_proc`` or min(4, usable cpus)."""
        if self.num_proc is not None:
            return self.num_proc
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            cpus = os.cpu_count() or 1
        return max(1, min(4, cpus))

    def resolved_cache_dir(self) -> Path:
        """``cache_dir`` or ``~/.cache/dcd-cache`` (the trainer passes ``<output_dir>/dcd-cache``)."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path("~/.cache/dcd-cache").expanduser()

    def template_text(self) -> str:
        """The Jinja source of ``chat_template``: a built-in name, a ``.jinja`` file or inline Jinja."""
        from dcd_megatron.data.templates import BUILTIN_TEMPLATE_SOURCES

        tpl = self.chat_template
        if tpl in BUILTIN_TEMPLATE_SOURCES:
            return BUILTIN_TEMPLATE_SOURCES[tpl]
        if tpl.endswith((".jinja", ".j2")):
            path = Path(tpl).expanduser()
            if not path.is_file():
                raise DataConfigError(f"data.chat_template={tpl!r}: template file does not exist")
            return path.read_text()
        if "{{" in tpl or "{%" in tpl:
            return tpl
        raise DataConfigError(
            f"data.chat_template={tpl!r}: use one of {', '.join(BUILTIN_TEMPLATES)}, a path to a "
            ".jinja file, or an inline Jinja template (rendering `messages`)"
        )

    def require_sources(self) -> None:
        """Fail early, by field name, when the settings needed to read data are missing."""
        if not self.train_path:
            raise DataConfigError(
                "data.train_path is empty: set it to a JSONL/Parquet file, glob, directory or "
                "dataset name, e.g. data.train_path=/data/traces.jsonl"
            )
        if not self.tokenizer:
            raise DataConfigError(
                "data.tokenizer is empty: set it to a SentencePiece .model, a tokenizer.json, "
                "or a directory holding one"
            )
