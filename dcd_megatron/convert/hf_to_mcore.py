"""Hugging Face Llama/Qwen2 directory -> one of our checkpoints (megatron dist checkpoint + meta.json).

The result loads at any TP x PP layout (distributed checkpoints reshard on load), so the
conversion itself runs at TP=1, PP=1 in one process on CPU. The directory holds:
- the distributed checkpoint (the "model" key of the sharded state dict, as dcd-train saves it),
- `meta.json`: the TrainConfig with the HF architecture, `padded_vocab_size`, and
  the source `config.json` under `hf` (dcd-convert mcore-to-hf reuses it),
- `manifest.json` (written last): every file's size and sha256, verified by every reader,
- `train.yaml`: the same TrainConfig, ready for `dcd-train --config` with
  `model.init_checkpoint` pointing here.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from dcd_megatron.convert.errors import ConvertError
from dcd_megatron.convert.hf_config import model_config_from_hf
from dcd_megatron.convert.hf_files import HFWeights, find_tokenizer, read_config
from dcd_megatron.convert.tensors import Arch, hf_to_mcore

TRAIN_YAML = "train.yaml"


@dataclass
class ImportResult:
    """Where the converted checkpoint is and what it holds."""

    checkpoint: Path
    config: object  # TrainConfig
    padded_vocab_size: int
    num_parameters: int


def default_train_config(model, tokenizer: Path, out: Path):
    """A TrainConfig that starts from the converted weights; data paths are the user's to set."""
    from dcd_megatron.data.config import DataConfig
    from dcd_megatron.configs.train import TrainConfig

    model.init_checkpoint = str(out)
    data = DataConfig(tokenizer=str(tokenizer), seq_length=min(2048, model.max_position_embeddings))
    return TrainConfig(model=model, data=data)


def _fill_parameters(module, model, weights, padded: int) -> dict:
    """Copy every HF tensor into `module`'s parameters; refuse shapes or tensors that do not match."""
    params = dict(module.named_parameters())
    filled: set[str] = set()
    with torch.no_grad():
        for name, tensor in hf_to_mcore(Arch.from_model_config(model), weights.get, padded_vocab=padded):
            if name not in params:
                raise ConvertError(f"internal: megatron model has no parameter {name!r}")
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise ConvertError(
                    f"{name}: the weights give shape {tuple(tensor.shape)} but config.json implies "
                    f"{tuple(params[name].shape)}; config.json does not describe these weights"
                )
            params[name].copy_(tensor)
            filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ConvertError(f"internal: no HF tensor mapped to megatron parameters {missing[:5]}")
    if model.untie_embeddings_and_output_weights is False and "lm_head.weight" in weights.names():
        # some tied checkpoints also store the (identical) head; it must really be the embedding
        if not torch.equal(weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")):
            raise ConvertError("config.json has tie_word_embeddings=true but lm_head.weight differs from the embedding")
    unused = weights.unused()
    if unused:
        raise ConvertError(f"the HF checkpoint has tensors this architecture does not use: {unused[:5]} ...")
    return params


def convert_hf_to_mcore(
    hf_dir: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
) -> ImportResult:
    """Convert `hf_dir` into our checkpoint format at `out` (written atomically)."""
    from megatron.core import dist_checkpointing

    from dcd_megatron.checkpoint import META, use_in_process_write_results, write_manifest
    from dcd_megatron.configs import to_dict
    from dcd_megatron.convert.model_io import build_empty_model, single_process_group
    from dcd_megatron.data import load_tokenizer
    from dcd_megatron.runtime.layout import Layout

    hf_dir, out = Path(hf_dir).resolve(), Path(out).resolve()
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists; pass --overwrite or choose another --out")
    hf_cfg = read_config(hf_dir)
    model = model_config_from_hf(hf_cfg, dtype=dtype, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    tok_path = Path(tokenizer).resolve() if tokenizer else find_tokenizer(hf_dir)
    if tok_path is None:
        raise ConvertError(f"{hf_dir} has no tokenizer.json or *.model; pass --tokenizer PATH (the student's tokenizer)")
    tok = load_tokenizer(tok_path)
    if tok.vocab_size > model.vocab_size:
        raise ConvertError(
            f"the tokenizer {tok_path} has {tok.vocab_size} tokens but the model only {model.vocab_size} "
            "embedding rows; pass the tokenizer that belongs to this model (--tokenizer)"
        )
    weights = HFWeights(hf_dir)

    device = torch.device("cpu")
    single_process_group(device)
    padded = model.padded_vocab_size(model.vocab_size, 1)
    module = build_empty_model(model, padded_vocab=padded, layout=Layout(1, 1, 1, 1), device=device)
    params = _fill_parameters(module, model, weights, padded)

    cfg = default_train_config(model, tok_path, out)
    config_text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    use_in_process_write_results()
    dist_checkpointing.save({"model": module.sharded_state_dict()}, str(tmp))
    meta = {
        "config": config_text,
        "step": 0,
        "consumed_samples": 0,
        "padded_vocab_size": padded,
        "converted_from": str(hf_dir),
        "hf": {"source": str(hf_dir), "config": hf_cfg},
        "tokenizer_fingerprint": tok.fingerprint,
    }
    (tmp / META).write_text(json.dumps(meta, indent=1))
    write_manifest(tmp)  # every file's size and sha256: readers verify before loading
    (tmp / TRAIN_YAML).write_text(config_text)  # after the manifest: users may edit it
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    n_params = sum(p.numel() for p in params.values())
    return ImportResult(checkpoint=out, config=cfg, padded_vocab_size=padded, num_parameters=n_params)
