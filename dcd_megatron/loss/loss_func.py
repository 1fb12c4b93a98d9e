"""The Megatron-Core loss function of DCD: ``(loss_sum, num_tokens, report)`` per micro-batch.

Used inside a forward step as ``return output_tensor, functools.partial(loss_fn, batch)``
with ``TransformerConfig(calculate_per_token_loss=True)``. On the last pipeline stage it
gets the vocabulary-sharded logits ``[b, s, V/tp]`` and returns
``sum_t m_t * w_t * term_t`` (``term_t = -s_t`` by default), the number of valid tokens,
and a report (see ``report.py``). The per-token term is pluggable (``token_term``), so a
top-k KL can replace ``-s_t`` under the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from dcd_megatron.loss.config import DCDConfig
from dcd_megatron.loss.logprobs import vocab_parallel_logprobs
from dcd_megatron.loss.report import build_report
from dcd_megatron.loss.weights import (
    check_teacher,
    checked_entropy,
    compute_weights,
    nonfinite_teacher_count,
    normalize_weights,
    raise_for_nonfinite_teacher,
)

# term(logits [b, s, V/tp], batch, student_logprobs [b, s] fp32) -> per-token loss [b, s]
TokenTerm = Callable[[torch.Tensor, Mapping[str, torch.Tensor], torch.Tensor], torch.Tensor]


def nll_term(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], student_logprobs: torch.Tensor) -> torch.Tensor:
    """The default per-token term: the student's negative log-likelihood of the teacher token."""
    return -student_logprobs


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def validate_batch(batch: Mapping[str, torch.Tensor], logits: torch.Tensor, config: DCDConfig) -> None:
    """Shapes, dtypes and required keys, checked before any computation."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"DCD loss expects floating-point vocab-sharded logits [b, s, V/tp] (GPTModel with labels=None), got {got}"
        )
    for key in ("labels", "loss_mask"):
        if key not in batch or batch[key] is None:
            raise ValueError(f"DCD loss: batch has no {key!r}; the data pipeline must provide labels and loss_mask [b, s]")
    shape = logits.shape[:2]
    expected = {"labels": "integer", "loss_mask": "any", "teacher_logprobs": "float",
                "segment_ids": "integer", "response_frac": "float"}
    for key, kind in expected.items():
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


def gate_entropy(batch: Mapping[str, torch.Tensor], config: DCDConfig) -> torch.Tensor | None:
    """The teacher's per-token entropy ``[b, s]`` for the entropy gate (None when not asked for)."""
    return checked_entropy(batch.get("teacher_topk_logprobs"), batch["loss_mask"] > 0, config)


class DCDLossFunction:
    """Callable ``(batch, logits) -> (loss_sum, num_tokens, report)``; set ``.step`` each step."""

    def __init__(
        self,
        config: DCDConfig,
        *,
        tp_group: dist.ProcessGroup | None = None,
        cp_group: dist.ProcessGroup | None = None,
        dp_group: dist.ProcessGroup | None = None,
        step: int = 0,
        cp_layout: str | None = None,
        token_term: TokenTerm | None = None,
    ) -> None:
        self.config = config
        self.tp_group = tp_group
        self.cp_group = cp_group
        self.dp_group = dp_group  # unused by the per-micro-batch math; kept for a uniform API
        self.step = step
        self.cp_layout = cp_layout
        if token_term is None and config.term == "topk_kl":
            from dcd_megatron.loss.topk_kl import TopKKLTerm

            token_term = TopKKLTerm(tp_group)
        self.token_term = token_term or nll_term

    def _tp_size(self) -> int:
        if self.tp_group is None or not dist.is_initialized():
            return 1
        return dist.get_world_size(self.tp_group)

    def checked_teacher(self, labels, teacher, valid, vocab_shard: int):
        """Masked-in labels inside the vocabulary and finite teacher log-probs (one host sync for
        both); returns the teacher log-probs to use: None where the method never reads them."""
        vocab = vocab_shard * self._tp_size()
        bad_labels = (((labels < 0) | (labels >= vocab)) & valid).sum()
        n_labels, n_teacher = torch.stack([bad_labels, nonfinite_teacher_count(teacher, valid)]).tolist()
        if n_labels:
            raise ValueError(
                f"DCD loss: {n_labels} loss-masked-in label(s) are outside the vocabulary [0, {vocab}); "
                "check the tokenizer / vocab size, or set loss_mask 0 on those positions"
            )
        if n_teacher and not self.config.needs_teacher:
            # sft / student_only never read teacher log-probs: traces that lack some (NaN) are
            # fine; the log-ratio diagnostic is then left out for this micro-batch.
            teacher, n_teacher = None, 0
        raise_for_nonfinite_teacher(n_teacher)
        return teacher

    def __call__(self, batch: Mapping[str, torch.Tensor], output_tensor: torch.Tensor, output_weight=None):
        if output_weight is not None:  # hidden states [b, s, h] + the [V/tp, h] weight: chunked.py
            from dcd_megatron.loss.chunked import chunked_loss

            return chunked_loss(self, batch, output_tensor, output_weight)
        logits = output_tensor
        validate_batch(batch, logits, self.config)
        labels, teacher = batch["labels"], batch.get("teacher_logprobs")
        valid = batch["loss_mask"] > 0

        teacher = self.checked_teacher(labels, teacher, valid, logits.shape[-1])

        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        student = vocab_parallel_logprobs(logits, safe_labels, group=self.tp_group)
        frac = batch.get("response_frac")
        result = compute_weights(
            student, teacher, valid, self.config,
            segment_ids=batch.get("segment_ids"), cp_group=self.cp_group,
            cp_layout_name=self.cp_layout, step=self.step, want_response_frac=frac is None,
            entropy=gate_entropy(batch, self.config),
        )
        weights = result.weights
        if self.config.normalize == "micro":
            weights = normalize_weights(weights, valid, "micro", group=self.cp_group)
        term = self.token_term(logits, batch, student)
        loss_sum = torch.where(valid, weights * term, torch.zeros_like(term)).sum()
        num_tokens = valid.sum().to(torch.int)
        report = build_report(
            loss_sum=loss_sum, student_logprobs=student, result=result, valid=valid,
            response_frac=frac if frac is not None else result.response_frac,
            global_norm=self.config.normalize == "global",
        )
        return loss_sum, num_tokens, report


def make_loss_func(
    config: DCDConfig,
    *,
    tp_group: dist.ProcessGroup | None = None,
    cp_group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
    step: int = 0,
    cp_layout: str | None = None,
    token_term: TokenTerm | None = None,
) -> DCDLossFunction:
    """The DCD loss function for megatron's schedules; use ``functools.partial(fn, batch)``."""
    return DCDLossFunction(
        config, tp_group=tp_group, cp_group=cp_group, dp_group=dp_group,
        step=step, cp_layout=cp_layout, token_term=token_term,
    )
