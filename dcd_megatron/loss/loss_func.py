"""The Megatron-Core loss function of DCD: ``(loss_sum, num_tokens, report)`` per micro-batch.

Used inside a forward step as ``return output_tensor, functools.partial(loss_fn, batch)``
with ``TransformerConfig(calculate_per_token_loss=True)``. On the last pipeline stage it
gets the vocabulary-sharded logits ``[b, s, V/tp]`` and returns
``sum_t m_t * w_t * term_t`` (``term_t = -s_t`` by default), the number of valid tokens,
and a report (see ``report.py``). The per-token term is pluggable (``token_term``), so a
top-k KL can replace ``-s_t`` under the same weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from dcd_megatron.loss.chunked import chunked_loss
from dcd_megatron.loss.config import DCDConfig
from dcd_megatron.loss.contract import TokenTerm, checked_teacher, gate_entropy, nll_term, validate_batch
from dcd_megatron.loss.logprobs import _group_rank_size, vocab_parallel_logprobs
from dcd_megatron.loss.report import build_report
from dcd_megatron.loss.weights import REFERENCE_KEY, compute_weights, normalize_weights

__all__ = ["DCDLossFunction", "TokenTerm", "make_loss_func", "nll_term", "validate_batch"]


class DCDLossFunction:
    """Callable ``(batch, logits) -> (loss_sum, num_tokens, report)``; set ``.step`` each step."""

    def __init__(
        self,
        config: DCDConfig,
        *,
        tp_group: dist.ProcessGroup | None = None,
        cp_group: dist.ProcessGroup | None = None,
        step: int = 0,
        cp_layout: str | None = None,
        token_term: TokenTerm | None = None,
        chunk_elements: int | None = None,
    ) -> None:
        self.config = config
        self.chunk_elements = chunk_elements  # vocab_parallel_logprobs' block size (None: by device)
        self.tp_group = tp_group
        self.cp_group = cp_group
        self.step = step
        self.cp_layout = cp_layout
        if token_term is None and config.term == "topk_kl":
            from dcd_megatron.loss.topk_kl import TopKKLTerm

            token_term = TopKKLTerm(tp_group)
        self.token_term = token_term or nll_term

    def __call__(self, batch: Mapping[str, torch.Tensor], output_tensor: torch.Tensor, output_weight=None):
        if output_weight is not None:  # hidden states [b, s, h] + the [V/tp, h] weight: chunked.py
            return chunked_loss(
                batch, output_tensor, output_weight, config=self.config, term=self.token_term,
                tp_group=self.tp_group, cp_group=self.cp_group, cp_layout=self.cp_layout, step=self.step,
            )
        logits = output_tensor
        validate_batch(batch, logits, self.config)
        labels, teacher = batch["labels"], batch.get("teacher_logprobs")
        valid = batch["loss_mask"] > 0

        reference = batch.get(REFERENCE_KEY)
        teacher = checked_teacher(self.config, labels, teacher, valid, logits.shape[-1] * _group_rank_size(self.tp_group)[1],
                                  reference)

        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        student = vocab_parallel_logprobs(logits, safe_labels, group=self.tp_group, chunk_elements=self.chunk_elements)
        frac = batch.get("response_frac")
        result = compute_weights(
            student, teacher, valid, self.config,
            segment_ids=batch.get("segment_ids"), cp_group=self.cp_group,
            cp_layout_name=self.cp_layout, step=self.step, want_response_frac=frac is None,
            entropy=gate_entropy(batch, self.config), reference_logprobs=reference,
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


def make_loss_func(config: DCDConfig, **kwargs) -> DCDLossFunction:
    """The DCD loss function for megatron's schedules (``DCDLossFunction``'s keywords); use
    ``functools.partial(fn, batch)``."""
    return DCDLossFunction(config, **kwargs)
