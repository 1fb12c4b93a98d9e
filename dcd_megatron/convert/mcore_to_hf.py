"""One of our checkpoints (converted or trained by dcd-train) -> a Hugging Face model directory.

Writes `model.safetensors` (sharded above 5 GB), `config.json` and the tokenizer files, so
`transformers.AutoModelForCausalLM.from_pretrained(out)` loads it. The original HF config.json,
when known (the checkpoint's own meta, or that of its `model.init_checkpoint`), is the template
for every field the architecture does not fix (special token ids, generation settings, ...).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dcd_megatron.convert.errors import ConvertError
from dcd_megatron.convert.hf_config import hf_config_from_model
from dcd_megatron.convert.hf_files import copy_tokenizer_files, read_config, save_weights
from dcd_megatron.convert.tensors import Arch, mcore_to_hf

_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportResult:
    """Where the HF model is and where its config came from."""

    out_dir: Path
    checkpoint: Path
    template: str | None
    files: list[str]


def find_hf_template(cfg, meta: dict, explicit: str | Path | None) -> tuple[dict | None, Path | None, str | None]:
    """(template config.json, source HF dir, a description) for the export."""
    from dcd_megatron.checkpoint import META

    if explicit:
        return read_config(Path(explicit)), Path(explicit), f"--hf-template {explicit}"
    if meta.get("hf"):
        return meta["hf"]["config"], Path(meta["hf"]["source"]), "this checkpoint's meta.json"
    init = cfg.model.init_checkpoint
    if init and (Path(init) / META).is_file():
        init_meta = json.loads((Path(init) / META).read_text())
        if init_meta.get("hf"):
            return init_meta["hf"]["config"], Path(init_meta["hf"]["source"]), f"model.init_checkpoint {init}"
    return None, None, None


def convert_mcore_to_hf(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    hf_template: str | Path | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export `checkpoint` (run dir, checkpoints/ or iter dir) as a HF model at `out`."""
    from dcd_megatron.convert.model_io import load_megatron_model, single_process_group
    from dcd_megatron.data import load_tokenizer
    from dcd_megatron.checkpoint import read_checkpoint_config
    from dcd_megatron.runtime.layout import Layout

    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists; pass --overwrite or choose another --out")
    path, cfg, meta = read_checkpoint_config(Path(checkpoint))
    dtype = dtype or cfg.model.params_dtype
    if dtype not in _TORCH:
        raise ConvertError(f"--dtype {dtype!r}: use fp32, bf16 or fp16")
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type)
    model_cfg = cfg.model
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = tokenizer.vocab_size
    template, source_dir, template_from = find_hf_template(cfg, meta, hf_template)
    special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    hf_cfg = hf_config_from_model(model_cfg, dtype=dtype, template=template, special_ids=special)

    device = torch.device("cpu")
    single_process_group(device)
    module, _, _, _ = load_megatron_model(path, layout=Layout(1, 1, 1, 1), device=device)
    state = {name: p.detach() for name, p in module.named_parameters()}
    tensors = {name: t.to(_TORCH[dtype]).contiguous() for name, t in mcore_to_hf(Arch.from_model_config(model_cfg), state)}

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = [p.name for p in save_weights(tensors, tmp)]
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    tok_path = Path(tokenizer.path)
    files += copy_tokenizer_files(tok_path.parent, tmp)
    if tok_path.suffix == ".model" and not (tmp / "tokenizer.model").exists():
        shutil.copy2(tok_path, tmp / "tokenizer.model")
        files.append("tokenizer.model")
    if source_dir is not None and (source_dir / "generation_config.json").is_file():
        shutil.copy2(source_dir / "generation_config.json", tmp / "generation_config.json")
        files.append("generation_config.json")
    files.append("config.json")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return ExportResult(out_dir=out, checkpoint=path, template=template_from, files=sorted(files))
