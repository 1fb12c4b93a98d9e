"""One micro-batch through the model: inputs for GPTModel and the DCD loss, for megatron's schedule."""

from __future__ import annotations

import functools

import torch


def model_inputs(batch: dict, *, packed: bool, use_te: bool) -> dict:
    """Keyword arguments for GPTModel.forward (labels=None, so it returns vocab-sharded logits).

    Packed samples keep attention inside each document: on the local spec through a
    block-diagonal causal mask, on Transformer Engine through THD `packed_seq_params`.
    RoPE is relative, so positions need no per-document reset inside the mask.
    """
    from dcd_megatron.data.masks import packed_causal_mask, packed_seq_params_from_segments

    kwargs = {
        "input_ids": batch["tokens"],
        "position_ids": batch["position_ids"],
        "attention_mask": None,
    }
    if packed:
        if use_te:
            kwargs["packed_seq_params"] = packed_seq_params_from_segments(batch["segment_ids"])
        else:
            kwargs["attention_mask"] = packed_causal_mask(batch["segment_ids"])
    return kwargs


def make_forward_step(
    loss_func, *, packed: bool, use_te: bool, device: torch.device, cp_split=None, hidden_states: bool = False
):
    """The `forward_step_func` for megatron-core's `get_forward_backward_func()`.

    `cp_split(batch)` slices a batch to this context-parallel rank's chunks (None when cp == 1).
    `hidden_states`: the model returns its final hidden states (`builder.return_hidden_states`)
    and the loss gets the output-layer weight too (the chunked DCD loss).
    """
    from dcd_megatron.model.builder import output_weight

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if cp_split is not None:
            batch = cp_split(batch)
        output = model(**model_inputs(batch, packed=packed, use_te=use_te))
        if hidden_states:
            return output, functools.partial(loss_func, batch, output_weight=output_weight(model))
        return output, functools.partial(loss_func, batch)

    return forward_step
