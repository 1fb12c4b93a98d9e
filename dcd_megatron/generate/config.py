"""`GenerateConfig`: which teacher samples which prompts, with which sampling rule, and where the traces go."""

from dataclasses import dataclass, field
from typing import Literal

from dcd_megatron.data.config import DataConfig
from dcd_megatron.errors import UserError


class GenerateError(UserError, ValueError):
    """Generation cannot run as asked; the message names the setting and the fix."""


BACKENDS = ("megatron",)  # the vLLM adapter of issue 19 is not built yet


@dataclass
class GenerateConfig:
    """Settings of one `dcd-generate` run. `data` is the STUDENT's data section (it fixes the prompt ids)."""

    teacher: str = ""  # one of our checkpoints (dcd-convert hf-to-mcore output, or a dcd-train run)
    prompts: str = ""  # FILE or BENCHMARK=FILE (gsm8k rows: question, answer ending in '#### N')
    out_dir: str = ""
    data: DataConfig = field(default_factory=DataConfig)  # data.tokenizer = the student's tokenizer
    teacher_tokenizer: str | None = None  # None = the data.tokenizer the teacher's checkpoint records
    template: str | None = None  # prompt template name or '{question}' format; None = the benchmark's default
    n: int = 8  # samples per prompt
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0 = no top-k
    max_new_tokens: int = 1024
    logprob_top_k: int = 0  # also store the top-K ids and log-probs of the sampling distribution per token
    seed: int = 0
    max_per_prompt: int | None = None  # keep at most this many correct samples of a prompt (None = all)
    prompts_per_shard: int = 64  # the unit of resumption: all n samples of this many prompts
    batch_size: int = 8  # rows decoded together
    limit: int | None = None  # the first `limit` prompts only
    grade_workers: int = 2  # processes grading answers (0 = in this process)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: str = "megatron"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The checks run at construction; call again after changing fields in place."""
        for name, hint in (("teacher", "--teacher CKPT"), ("prompts", "--prompts FILE"), ("out_dir", "--out DIR")):
            if not getattr(self, name):
                raise GenerateError(f"{name} is empty: pass {hint}")
        if not self.data.tokenizer:
            raise GenerateError(
                "the student tokenizer is unknown: pass --student-tokenizer PATH, --recipe R or the student's "
                "training config (--config STUDENT.yaml, its data.tokenizer)"
            )
        if self.backend not in BACKENDS:
            raise GenerateError(f"--backend {self.backend!r} is not available; use one of {list(BACKENDS)}")
        if self.n < 1:
            raise GenerateError(f"--n must be >= 1 (samples per prompt), got {self.n}")
        if not self.temperature > 0:
            raise GenerateError(
                f"--temperature must be > 0, got {self.temperature}: traces are sampled (greedy decoding has "
                "no distribution to distil); use e.g. --temperature 0.7"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise GenerateError(f"--top-p must be in (0, 1], got {self.top_p}; 1 keeps every token")
        for name in ("top_k", "logprob_top_k"):
            if getattr(self, name) < 0:
                raise GenerateError(f"--{name.replace('_', '-')} must be >= 0 (0 = off), got {getattr(self, name)}")
        for name in ("max_new_tokens", "prompts_per_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise GenerateError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_per_prompt", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise GenerateError(f"--{name.replace('_', '-')} must be >= 1 or unset, got {value}")
        if self.grade_workers < 0:
            raise GenerateError(f"--grade-workers must be >= 0, got {self.grade_workers}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise GenerateError(f"device must be auto, cpu or cuda, got {self.device!r}")
