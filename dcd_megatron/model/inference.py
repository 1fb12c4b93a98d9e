"""Load a trained student (a dcd-train checkpoint) in one process for generation and scoring.

Megatron's distributed checkpoints reshard on load, so a model trained at any TP x PP layout
loads here at TP=1, PP=1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml


def ensure_single_process_group(device: torch.device) -> None:
    """A one-rank process group and megatron parallel state, unless already initialised."""
    from megatron.core import parallel_state

    from dcd_megatron.runtime import cpu_compat
    from dcd_megatron.runtime.distributed import free_port, init_model_parallel
    from dcd_megatron.runtime.layout import Layout

    if device.type == "cpu":
        cpu_compat.apply()
    if not torch.distributed.is_initialized():
        port = free_port()
        # An explicit init_method, not MASTER_ADDR/PORT: subprocesses started later copy
        # os.environ and must not be told to rendezvous on the port this group holds.
        torch.distributed.init_process_group(
            "gloo" if device.type == "cpu" else "nccl",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=0,
            world_size=1,
        )
    if not parallel_state.model_parallel_is_initialized():
        init_model_parallel(Layout(1, 1, 1, 1), seed=0)


@dataclass
class LoadedModel:
    """A single-process student: `logits(tokens)` returns fp32 `[b, t, vocab]` (padding removed)."""

    module: torch.nn.Module
    config: object  # TrainConfig
    vocab_size: int
    device: torch.device

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = tokens.to(self.device)
        b, t = tokens.shape
        position_ids = torch.arange(t, device=self.device).unsqueeze(0).expand(b, t)
        out = self.module(input_ids=tokens, position_ids=position_ids, attention_mask=attention_mask)
        return out[..., : self.vocab_size].float()


def read_checkpoint_config(checkpoint: Path):
    """(checkpoint dir, the TrainConfig it was trained with, its meta record)."""
    from dcd_megatron.configs import from_dict
    from dcd_megatron.train.checkpoint import META, find_latest
    from dcd_megatron.train.config import TrainConfig

    checkpoint = Path(checkpoint)
    if not (checkpoint / META).is_file():
        latest = find_latest(checkpoint) or find_latest(checkpoint / "checkpoints")
        if latest is None:
            raise FileNotFoundError(
                f"{checkpoint} holds no complete dcd-train checkpoint (a directory with {META}); "
                "pass a run's output_dir, its checkpoints/ folder or one iter_NNNNNNN folder"
            )
        checkpoint = latest
    meta = json.loads((checkpoint / META).read_text())
    if not meta.get("config"):
        raise ValueError(f"{checkpoint}/{META} has no training config; it was not written by dcd-train")
    return checkpoint, from_dict(TrainConfig, yaml.safe_load(meta["config"])), meta


def load_trained_model(checkpoint: str | Path, device: str = "auto") -> tuple[LoadedModel, object]:
    """(model, tokenizer) from a dcd-train checkpoint, at TP=1/PP=1 on `device`."""
    from megatron.core import dist_checkpointing

    from dcd_megatron.data import load_tokenizer
    from dcd_megatron.model.builder import build_gpt_model, transformer_config
    from dcd_megatron.runtime.distributed import has_transformer_engine, resolve_device
    from dcd_megatron.runtime.layout import Layout

    path, cfg, meta = read_checkpoint_config(Path(checkpoint))
    dev = resolve_device(device)
    ensure_single_process_group(dev)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type)
    vocab = cfg.model.vocab_size or tokenizer.vocab_size
    layout = Layout(1, 1, 1, 1)
    use_te = dev.type == "cuda" and has_transformer_engine()
    tconfig = transformer_config(cfg.model, layout, sequence_parallel=False, on_cpu=dev.type == "cpu")
    module = build_gpt_model(
        cfg.model,
        tconfig,
        # the padded size the checkpoint was trained with (it depends on the training TP)
        padded_vocab_size=int(meta.get("padded_vocab_size") or cfg.model.padded_vocab_size(vocab, 1)),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=True,
        post_process=True,
        use_te=use_te,
    ).to(dev)
    state = dist_checkpointing.load({"model": module.sharded_state_dict()}, str(path))
    module.load_state_dict(state["model"])
    module.eval()
    return LoadedModel(module=module, config=cfg, vocab_size=vocab, device=dev), tokenizer
