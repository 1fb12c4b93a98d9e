"""Tiny random Hugging Face Llama/Qwen2 models and traces: for tests and the worked example.

    python -m dcd_megatron.convert.tiny OUT_DIR

writes OUT_DIR/student-hf (Qwen2-style, tied embeddings), OUT_DIR/teacher-hf (Llama-style,
untied, one more layer), both with the digit-sum task's tokenizer, and OUT_DIR/traces.jsonl
(prompt/response rows without teacher log-probs). See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from dcd_megatron.convert.hf_files import TOKENIZER_FILES


def make_tiny_hf_model(
    out_dir: str | Path,
    *,
    arch: str,
    tokenizer_dir: str | Path,
    tied: bool,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    ffn_size: int = 128,
    rope_theta: float = 10000.0,
    std: float = 0.1,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised fp32 HF causal LM whose weights give well-spread logits."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from dcd_megatron.data import load_tokenizer

    tok = load_tokenizer(Path(tokenizer_dir) / "tokenizer.json")
    common = dict(
        vocab_size=tok.vocab_size, hidden_size=hidden_size, intermediate_size=ffn_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=rope_theta,
        tie_word_embeddings=tied, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    else:
        raise ValueError(f"arch must be llama or qwen2, got {arch!r}")  # internal
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + std * torch.randn_like(p))  # non-trivial norm scales
            else:
                p.normal_(0.0, std)  # biases too: Qwen2's q/k/v biases must matter
    out = Path(out_dir)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy2(Path(tokenizer_dir) / name, out / name)
    return out


def make_example(out_dir: str | Path, *, n_rows: int = 64, seed: int = 0) -> dict[str, Path]:
    """The worked example's inputs: a student and a teacher HF model sharing a tokenizer, and traces."""
    from dcd_megatron.lab import task

    out = Path(out_dir)
    tok_dir = out / "tokenizer"
    task.build_tokenizer(tok_dir)
    student = make_tiny_hf_model(out / "student-hf", arch="qwen2", tokenizer_dir=tok_dir, tied=True, seed=seed)
    teacher = make_tiny_hf_model(
        out / "teacher-hf", arch="llama", tokenizer_dir=tok_dir, tied=False, num_layers=3, seed=seed + 1
    )
    rows = task.teacher_rows(n_rows, k_min=2, k_max=5, style_weights={"verbose": 1.0, "skip2": 1.0}, seed=seed)
    traces = out / "traces.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"student": student, "teacher": teacher, "traces": traces, "tokenizer": tok_dir}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the tiny worked example of docs/checkpoints.md.")
    parser.add_argument("out_dir")
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args(argv)
    for name, path in make_example(args.out_dir, n_rows=args.rows).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
