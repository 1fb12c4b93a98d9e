"""What the DCD loss reads: the batch (one typed dict of its keys) and the per-token term.

Both loss paths use this module: ``loss_func.py`` (vocab-sharded logits) and ``chunked.py``
(final hidden states and the output-layer weight shard). The data pipeline
(``dcd_megatron.data``) builds batches with these keys and dtypes.

A per-token term ``term_t`` is what the weights multiply (``loss = sum_t m_t * w_t * term_t``).
Any callable ``term(logits [b, s, V/tp], batch, student_logprobs [b, s] fp32) -> [b, s]`` works
on the full-logits path. A term the chunked path can use also says which token ids it reads
and computes its value from their gathered log-probs (``GatheredTerm``): the chunked loss
gathers the log-probs of ``(label, those ids)`` per token and never makes the full logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, TypedDict, runtime_checkable

import torch

from dcd_megatron.loss.config import DCDConfig
from dcd_megatron.loss.weights import (
    REFERENCE_KEY,
    check_reference,
    check_teacher,
    checked_entropy,
    nonfinite_teacher_count,
    raise_for_nonfinite_reference,
    raise_for_nonfinite_teacher,
)


class DCDBatch(TypedDict, total=False):
    """One micro-batch as the loss (and megatron's forward step) gets it; per-token tensors are ``[b, s]``."""

    tokens: torch.Tensor  # int64 input ids (the forward step's, not the loss's)
    position_ids: torch.Tensor  # int64 positions (restart at 0 in each packed document)
    labels: torch.Tensor  # int64 next-token targets (required)
    loss_mask: torch.Tensor  # float32, 1 on trained tokens (required)
    teacher_logprobs: torch.Tensor  # float32 teacher log-prob of each label, NaN where unknown
    student_ref_logprobs: torch.Tensor  # float32 the initial student's log-prob of each label, NaN where unknown
    segment_ids: torch.Tensor  # int64 packed-document index, -1 on padding
    response_frac: torch.Tensor  # float32 position of each label in its response, in [0, 1)
    teacher_topk_ids: torch.Tensor  # int64 [b, s, k] the teacher's top-k ids, -1 where unknown
    teacher_topk_logprobs: torch.Tensor  # float32 [b, s, k] their log-probs, NaN where unknown


INT_KEYS = ("tokens", "labels", "position_ids", "segment_ids", "teacher_topk_ids")
FLOAT_KEYS = ("loss_mask", "teacher_logprobs", REFERENCE_KEY, "response_frac", "teacher_topk_logprobs")
REQUIRED_KEYS = ("labels", "loss_mask")
TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs")
# the [b, s] tensors the loss checks, and what each must hold
_PER_TOKEN = {"labels": "integer", "loss_mask": "any", "teacher_logprobs": "float", REFERENCE_KEY: "float",
              "segment_ids": "integer", "response_frac": "float"}

# term(logits [b, s, V/tp], batch, student_logprobs [b, s] fp32) -> per-token loss [b, s]
TokenTerm = Callable[[torch.Tensor, Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]
# on_logprobs(log-probs [n, 1 + k] of (label, the term's k ids), index of the rows [n]) -> per-token term [n]
OnLogProbs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@runtime_checkable
class GatheredTerm(Protocol):
    """A ``TokenTerm`` that also works from gathered log-probs (the chunked loss needs one)."""

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor], student_logprobs: torch.Tensor):
        ...

    def gathered(self, batch: Mapping[str, torch.Tensor], shape) -> tuple[torch.Tensor | None, OnLogProbs]:
        """``(the ids it reads besides the label [b, s, k] or None, its value from their log-probs)``."""
        ...


class NLLTerm:
    """The default per-token term: the student's negative log-likelihood of the teacher token."""

    def __call__(self, logits, batch, student_logprobs: torch.Tensor) -> torch.Tensor:
        return -student_logprobs

    def gathered(self, batch, shape):
        return None, lambda logprobs, rows: -logprobs[:, 0]

    def __repr__(self) -> str:
        return "nll_term"


nll_term = NLLTerm()


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def validate_batch(batch: Mapping[str, torch.Tensor], logits: torch.Tensor, config: DCDConfig) -> None:
    """Shapes, dtypes and required keys, checked before any computation."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"DCD loss expects floating-point vocab-sharded logits [b, s, V/tp] (GPTModel with labels=None), got {got}"
        )
    for key in REQUIRED_KEYS:
        if key not in batch or batch[key] is None:
            raise ValueError(f"DCD loss: batch has no {key!r}; the data pipeline must provide labels and loss_mask [b, s]")
    shape = logits.shape[:2]
    for key, kind in _PER_TOKEN.items():
        t = batch.get(key)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"DCD loss: batch[{key!r}] must be a tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(
                f"DCD loss: batch[{key!r}] has shape {tuple(t.shape)} but the logits are {tuple(logits.shape)}; "
                f"every per-token tensor must be [b, s] = {tuple(shape)}"
            )
        if kind == "integer" and not _integer(t):
            raise ValueError(f"DCD loss: batch[{key!r}] must hold integer ids, got {t.dtype}")
        if kind == "float" and not t.is_floating_point():
            raise ValueError(f"DCD loss: batch[{key!r}] must be floating point, got {t.dtype}")
    check_teacher(config, batch.get("teacher_logprobs"))
    check_reference(config, batch.get(REFERENCE_KEY))


def gate_entropy(batch: Mapping[str, torch.Tensor], config: DCDConfig) -> torch.Tensor | None:
    """The teacher's per-token entropy ``[b, s]`` for the entropy gate (None when not asked for)."""
    return checked_entropy(batch.get("teacher_topk_logprobs"), batch["loss_mask"] > 0, config)


def checked_teacher(config: DCDConfig, labels, teacher, valid, vocab: int, reference=None):
    """Masked-in labels inside the vocabulary ``[0, vocab)``, finite teacher log-probs and, where the
    weights read them, finite initial-student log-probs ``reference`` (one host sync for all);
    returns the teacher log-probs to use: None where the method never reads them."""
    bad_labels = (((labels < 0) | (labels >= vocab)) & valid).sum()
    ref = reference if config.needs_reference else None
    counts = [bad_labels, nonfinite_teacher_count(teacher, valid), nonfinite_teacher_count(ref, valid)]
    n_labels, n_teacher, n_reference = torch.stack(counts).tolist()
    if n_labels:
        raise ValueError(
            f"DCD loss: {n_labels} loss-masked-in label(s) are outside the vocabulary [0, {vocab}); "
            "check the tokenizer / vocab size, or set loss_mask 0 on those positions"
        )
    if n_teacher and not config.needs_teacher:
        # sft / student_only never read teacher log-probs: traces that lack some (NaN) are
        # fine; the log-ratio diagnostic is then left out for this micro-batch.
        teacher, n_teacher = None, 0
    raise_for_nonfinite_teacher(n_teacher)
    raise_for_nonfinite_reference(n_reference)
    return teacher
