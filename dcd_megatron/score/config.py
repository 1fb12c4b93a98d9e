"""`ScoreConfig`: which teacher scores which traces, how, and where the scored dataset goes."""

from dataclasses import dataclass, field
from typing import Literal

from dcd_megatron.data.config import DataConfig
from dcd_megatron.errors import UserError


class ScoreError(UserError, ValueError):
    """Scoring cannot run as asked; the message names the setting and the fix."""


@dataclass
class ScoreConfig:
    """Settings of one `dcd-score` run. `data` is the STUDENT's data section (it fixes tokenization)."""

    teacher: str = ""  # one of our checkpoints (e.g. made by dcd-convert hf-to-mcore)
    data_path: str = ""  # the traces to score (JSONL/Parquet file, glob, directory, dataset)
    out_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)  # data.tokenizer = the student's tokenizer
    teacher_tokenizer: str | None = None  # the teacher's tokenizer; None = the data.tokenizer its checkpoint records
    temperature: float = 1.0  # log_softmax(logits / temperature): the distribution the teacher sampled from
    top_k: int = 0  # also store the top-k token ids and log-probs per response token (0 = no)
    rows_per_shard: int = 256  # the unit of resumption and of data-parallel work
    batch_tokens: int = 8192  # padded tokens per forward pass
    max_length: int | None = None  # longest prompt+response; None = the teacher's max_position_embeddings
    tp: int = 1  # tensor parallel size for big teachers
    pp: int = 1  # pipeline parallel size for teachers too big for one TP group (divides its layers)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # score as the frozen initial student (loss.reference=initial): write student_ref_logprobs and the
    # checkpoint's identity (student_ref_checkpoint) beside the teacher columns, which are kept
    reference: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks run at construction; call again after changing fields in place."""
        for name, hint in (("teacher", "--teacher CKPT"), ("data_path", "--data PATH"), ("out_dir", "--out DIR")):
            if not getattr(self, name):
                raise ScoreError(f"{name} is empty: pass {hint}")
        if not self.data.tokenizer:
            raise ScoreError(
                "the student tokenizer is unknown: pass --student-tokenizer PATH or the student's "
                "training config (--config STUDENT.yaml, its data.tokenizer)"
            )
        if not self.temperature > 0:
            raise ScoreError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ScoreError(f"top_k must be >= 0 (0 = no top-k), got {self.top_k}")
        if self.rows_per_shard < 1:
            raise ScoreError(f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.batch_tokens < 1:
            raise ScoreError(f"batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.max_length is not None and self.max_length < 2:
            raise ScoreError(f"max_length must be >= 2 or unset, got {self.max_length}")
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ScoreError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.reference and (self.top_k or self.temperature != 1.0):
            raise ScoreError(
                f"--reference scores the student's own distribution at temperature 1 with no top-k, got "
                f"--temperature {self.temperature} --top-k {self.top_k}: drop those flags"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ScoreError(f"device must be auto, cpu or cuda, got {self.device!r}")
