"""Reading and writing Hugging Face model directories: config.json, weights, tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from dcd_megatron.convert.errors import ConvertError

# Files of a HF tokenizer (any that exist are copied next to exported weights).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
# Tensors HF checkpoints may carry that are not weights (recomputed by the model).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_json(path: Path, fix: str):
    """A JSON file's value; a ConvertError naming the file and ``fix`` when it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path} is not valid JSON ({exc}); {fix}") from None


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{hf_dir} has no config.json; pass a Hugging Face model directory (save_pretrained output)")
    config = _read_json(path, "pass a Hugging Face model directory whose config.json is intact")
    if not isinstance(config, dict):
        raise ConvertError(f"{path} holds a {type(config).__name__}, not a model config mapping")
    return config


def _weight_map(index: Path) -> dict:
    data = _read_json(index, "re-download or re-save the checkpoint")
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise ConvertError(f"{index} has no weight_map; re-download or re-save the checkpoint")
    return data["weight_map"]


class HFWeights:
    """Lazy access to a HF checkpoint's tensors (safetensors, sharded or not; or pytorch .bin)."""

    def __init__(self, hf_dir: Path):
        hf_dir = Path(hf_dir)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self._bins: dict[Path, dict[str, Tensor]] = {}
        index = hf_dir / "model.safetensors.index.json"
        bin_index = hf_dir / "pytorch_model.bin.index.json"
        if index.is_file():
            for name, file in _weight_map(index).items():
                self._where[name] = hf_dir / file
        elif (hf_dir / "model.safetensors").is_file():
            self._index_file(hf_dir / "model.safetensors")
        elif bin_index.is_file():
            for name, file in _weight_map(bin_index).items():
                self._where[name] = hf_dir / file
        elif (hf_dir / "pytorch_model.bin").is_file():
            self._where.update(dict.fromkeys(self._load_bin(hf_dir / "pytorch_model.bin"), hf_dir / "pytorch_model.bin"))
        else:
            raise ConvertError(
                f"{hf_dir} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
            )
        self.used: set[str] = set()

    def _index_file(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError for a missing shard)
            raise ConvertError(f"{path} is not a readable safetensors file ({exc}); re-download or re-save it") from None
        self._open[path] = handle
        self._where.update(dict.fromkeys(handle.keys(), path))

    def _load_bin(self, path: Path) -> dict[str, Tensor]:
        if path not in self._bins:
            try:
                self._bins[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (OSError, RuntimeError) as exc:
                raise ConvertError(f"{path} is not a readable PyTorch weights file ({exc}); re-download or re-save it") from None
        return self._bins[path]

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> Tensor:
        path = self._where.get(name)
        if path is None:
            raise ConvertError(f"the Hugging Face checkpoint has no tensor {name!r} (does config.json match the weights?)")
        self.used.add(name)
        if path.suffix == ".safetensors":
            if path not in self._open:
                self._index_file(path)
            return self._open[path].get_tensor(name)
        return self._load_bin(path)[name]

    def unused(self) -> list[str]:
        """Tensors no mapping asked for (other than known non-weights): a sign of a wrong mapping."""
        return sorted(n for n in self.names() - self.used if not n.endswith(IGNORED_SUFFIXES))


def save_weights(tensors: dict[str, Tensor], out_dir: Path, *, max_shard_size: str = "5GB") -> list[Path]:
    """Write `model.safetensors` (or shards plus `model.safetensors.index.json` when large)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    written = []
    for file, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, str(out_dir / file), metadata={"format": "pt"})
        written.append(out_dir / file)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return written


def find_tokenizer(hf_dir: Path) -> Path | None:
    """The tokenizer file a HF directory carries: tokenizer.json, else a SentencePiece model."""
    hf_dir = Path(hf_dir)
    if (hf_dir / "tokenizer.json").is_file():
        return hf_dir / "tokenizer.json"
    models = sorted(hf_dir.glob("*.model"))
    return models[0] if models else None


def copy_tokenizer_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy every tokenizer file present in `src_dir`; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        src = Path(src_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(out_dir) / name)
            copied.append(name)
    return copied
