"""Load a trained student (a dcd-train checkpoint) in one process for generation and scoring.

Megatron's distributed checkpoints reshard on load, so a model trained at any TP x PP layout
loads here at TP=1, PP=1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class LoadedModel:
    """A single-process student: `logits(tokens)` returns fp32 `[b, t, vocab]` (padding removed)."""

    module: torch.nn.Module
    config: object  # TrainConfig
    vocab_size: int
    device: torch.device
    path: Path | None = None  # the checkpoint directory it was read from

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = tokens.to(self.device)
        b, t = tokens.shape
        position_ids = torch.arange(t, device=self.device).unsqueeze(0).expand(b, t)
        out = self.module(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask)
        return out[..., : self.vocab_size].float()


def load_trained_model(checkpoint: str | Path, device: str = "auto") -> tuple[LoadedModel, object]:
    """(model, tokenizer) from a dcd-train checkpoint, at TP=1/PP=1 on `device`."""
    from megatron.core import dist_checkpointing

    from dcd_megatron.checkpoint import leases, read_checkpoint_config
    from dcd_megatron.data import load_tokenizer
    from dcd_megatron.model.builder import build_gpt_model, transformer_config
    from dcd_megatron.runtime.distributed import ensure_single_process_group, runtime_facts
    from dcd_megatron.runtime.layout import Layout

    path, cfg, meta = read_checkpoint_config(Path(checkpoint), hold=True)  # released once loaded
    facts = runtime_facts(device)
    dev = facts.device
    ensure_single_process_group(dev)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    layout = Layout(1, 1, 1, 1)
    tconfig = transformer_config(cfg.model, layout, sequence_parallel=False, facts=facts)
    module = build_gpt_model(
        cfg.model,
        tconfig,
        # the padded size the checkpoint was trained with (it depends on the training TP)
        padded_vocab_size=int(meta.get("padded_vocab_size") or cfg.model.padded_vocab_size(vocab, 1)),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=True,
        post_process=True,
        use_te=facts.has_te,
    ).to(dev)
    state = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(path))
    leases.release(path)  # loaded: a run rotating its checkpoints may remove it now
    module.load_state_dict(state["model"])
    module.eval()
    return LoadedModel(module=module, config=cfg, vocab_size=vocab, device=dev, path=path), tokenizer
