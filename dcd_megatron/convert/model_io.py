"""Build a megatron-core GPTModel without initialising it, and fill it from our checkpoints.

Conversion and scoring only ever overwrite the weights, so random initialisation (slow for
billions of parameters) is skipped. Parallel state must already be set up for `layout`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dcd_megatron.model.config import ModelConfig
from dcd_megatron.runtime.layout import Layout


@contextmanager
def unchanged_master_env() -> Iterator[None]:
    """Undo MASTER_ADDR/PORT changes made while a one-process group starts.

    The group keeps its port; subprocesses started later (which copy os.environ) must not be
    told to rendezvous on it.
    """
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def single_process_group(device: torch.device) -> None:
    """A one-rank process group and TP=1 parallel state (unless one exists), env left as it was."""
    from dcd_megatron.runtime.distributed import ensure_single_process_group

    with unchanged_master_env():
        ensure_single_process_group(device)


def build_empty_model(model: ModelConfig, *, padded_vocab: int, layout: Layout, device: torch.device, use_te: bool = False):
    """This rank's pipeline stage of the GPTModel, with uninitialised weights."""
    from megatron.core import parallel_state as ps

    from dcd_megatron.model.builder import build_gpt_model, transformer_config
    from dcd_megatron.runtime.distributed import runtime_facts

    tconfig = transformer_config(model, layout, sequence_parallel=False, facts=runtime_facts(device, use_te=use_te))
    tconfig.perform_initialization = False
    module = build_gpt_model(
        model,
        tconfig,
        padded_vocab_size=padded_vocab,
        max_sequence_length=model.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        use_te=use_te,
    )
    return module.to(device)


def checkpoint_padded_vocab(cfg, meta: dict, vocab_size: int) -> int:
    """The padded vocabulary the checkpoint was written with."""
    return int(meta.get("padded_vocab_size") or cfg.model.padded_vocab_size(vocab_size, 1))


def load_megatron_model(checkpoint: str | Path, *, layout: Layout, device: torch.device, use_te: bool = False):
    """(module, TrainConfig, meta, vocab_size) for this rank, loaded from one of our checkpoints.

    Loads at any TP x PP layout (distributed checkpoints reshard; vocabulary rows beyond the
    checkpoint's padding are zero). `checkpoint` may be a run dir, its checkpoints/ or an iter dir.
    """
    from megatron.core import dist_checkpointing

    from dcd_megatron.data import load_tokenizer
    from dcd_megatron.checkpoint import leases, read_checkpoint_config

    path, cfg, meta = read_checkpoint_config(Path(checkpoint), hold=True)  # released once loaded
    vocab = cfg.model.vocab_size or load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type).vocab_size
    padded = max(checkpoint_padded_vocab(cfg, meta, vocab), cfg.model.padded_vocab_size(vocab, layout.tp))
    if padded % layout.tp:
        padded = cfg.model.padded_vocab_size(padded, layout.tp)
    module = build_empty_model(cfg.model, padded_vocab=padded, layout=layout, device=device, use_te=use_te)
    state = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(path))
    leases.release(path)  # loaded: a run rotating its checkpoints may remove it now
    module.load_state_dict(state["model"])
    module.eval()
    return module, cfg, meta, vocab
