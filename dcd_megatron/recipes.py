"""Recipes: plain functions returning a complete TrainConfig, named for what they are.

A recipe may change sections in place; the config is validated as a whole where it is used
(`TrainConfig.validate`: after the overrides, and when the job starts).

Names follow `<model>_<task>_<n>gpu_<gpu>_<dtype>_config` (Megatron-Bridge's convention); the
short names in RECIPES are what `dcd-train --recipe` and the NeMo-Run CLI accept.
"""

from __future__ import annotations

from pathlib import Path

from dcd_megatron.configs.train import LoopConfig, OptimConfig, RuntimeConfig, TrainConfig
from dcd_megatron.data.config import DataConfig
from dcd_megatron.loss.config import DCDConfig
from dcd_megatron.model.config import ModelConfig
from dcd_megatron.runtime.layout import ParallelConfig
from dcd_megatron.tracking.config import TrackingConfig

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"


def demo_data(seq_length: int = 128) -> DataConfig:
    """The bundled digit-sum traces with teacher log-probs (made by scripts/make_demo_data.py)."""
    return DataConfig(
        train_path=str(DEMO_DIR / "train.jsonl"),
        valid_path=str(DEMO_DIR / "valid.jsonl"),
        tokenizer=str(DEMO_DIR / "tokenizer.json"),
        chat_template="plain",
        seq_length=seq_length,
        pack=True,
        num_proc=1,
    )


def tiny_model(**kw) -> ModelConfig:
    """A 2-layer, d=64 Llama-style student with GQA (about 0.1M parameters)."""
    base = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=192,
        max_position_embeddings=512,
        make_vocab_size_divisible_by=16,
    )
    base.update(kw)
    return ModelConfig(**base)


def tiny_distill_1cpu_fp32_config(output_dir: str = "runs/tiny_cpu") -> TrainConfig:
    """The `make demo` job: the tiny student on the bundled traces with the default (gated) DCD loss."""
    return TrainConfig(
        model=tiny_model(),
        parallel=ParallelConfig(),
        data=demo_data(),
        loss=DCDConfig(),  # the lab-chosen default (docs/loss.md, "Defaults")
        optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=10, weight_decay=0.01, clip_grad=1.0),
        train=LoopConfig(
            steps=120,
            global_batch_size=16,
            micro_batch_size=4,
            log_interval=10,
            eval_interval=40,
            eval_iters=2,
            save_interval=60,
            output_dir=output_dir,
        ),
        tracking=TrackingConfig(experiment="dcd-demo", plot_interval=40),
        runtime=RuntimeConfig(device="cpu"),
    )


def tiny_distill_1gpu_bf16_config(output_dir: str = "runs/tiny_gpu_bf16") -> TrainConfig:
    """The tiny job on one GPU in BF16 (the GPU smoke test)."""
    cfg = tiny_distill_1cpu_fp32_config(output_dir)
    cfg.model = tiny_model(params_dtype="bf16", hidden_size=128, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=384)
    cfg.runtime = RuntimeConfig(device="cuda")
    cfg.train.steps = 40
    cfg.tracking = TrackingConfig(experiment="dcd-smoke", plot_interval=0)
    return cfg


def tiny_distill_1gpu_fp8_config(output_dir: str = "runs/tiny_gpu_fp8") -> TrainConfig:
    """The tiny job on one GPU with FP8 (Transformer Engine; tensorwise current scaling)."""
    cfg = tiny_distill_1gpu_bf16_config(output_dir)
    cfg.model.fp8 = "hybrid"
    cfg.model.fp8_recipe = "tensorwise"
    return cfg


def qwen25_1p5b_model(**kw) -> ModelConfig:
    """Qwen2.5-1.5B's architecture (28 layers, d=1536, 12 heads / 2 KV groups, QKV bias, tied)."""
    base = dict(
        num_layers=28,
        hidden_size=1536,
        num_attention_heads=12,
        num_query_groups=2,
        ffn_hidden_size=8960,
        vocab_size=151936,
        make_vocab_size_divisible_by=128,
        max_position_embeddings=32768,
        rotary_base=1_000_000.0,
        norm_epsilon=1e-6,
        add_qkv_bias=True,
        untie_embeddings_and_output_weights=False,
        params_dtype="bf16",
    )
    base.update(kw)
    return ModelConfig(**base)


def qwen25_1p5b_distill_64gpu_h100_bf16_config(
    train_path: str = "/data/traces/train.parquet",
    tokenizer: str = "/models/qwen2.5-1.5b/tokenizer.json",
    init_checkpoint: str | None = "/models/qwen2.5-1.5b-mcore",
    output_dir: str = "/results/qwen25_1p5b_dcd",
) -> TrainConfig:
    """A Qwen2.5-1.5B-class student on 8 nodes x 8 H100, BF16, 16k-token reasoning traces."""
    return TrainConfig(
        model=qwen25_1p5b_model(init_checkpoint=init_checkpoint),
        parallel=ParallelConfig(tp=1, pp=1, cp=2),
        data=DataConfig(
            train_path=train_path,
            valid_fraction=0.005,
            tokenizer=tokenizer,
            chat_template="chatml",
            seq_length=16384,
            pack=True,
        ),
        loss=DCDConfig(),  # the lab-chosen default (docs/loss.md, "Defaults")
        optim=OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=50, weight_decay=0.01, clip_grad=1.0,
                          distributed_optimizer=True),
        train=LoopConfig(
            steps=2000,
            global_batch_size=128,
            micro_batch_size=1,
            log_interval=10,
            eval_interval=200,
            eval_iters=4,
            save_interval=200,
            output_dir=output_dir,
        ),
        tracking=TrackingConfig(experiment="dcd-qwen25-1p5b", plot_interval=100),
        runtime=RuntimeConfig(device="cuda"),
    )


def qwen25_1p5b_distill_64gpu_h100_fp8_config(**kw) -> TrainConfig:
    """The same job with FP8 transformer layers (TE tensorwise current scaling; LM head and loss BF16/FP32)."""
    cfg = qwen25_1p5b_distill_64gpu_h100_bf16_config(**kw)
    cfg.model.fp8 = "hybrid"
    cfg.model.fp8_recipe = "tensorwise"
    if cfg.train.output_dir.endswith("_dcd"):
        cfg.train.output_dir += "_fp8"
    return cfg


RECIPES = {
    "tiny_cpu": tiny_distill_1cpu_fp32_config,
    "tiny_gpu_bf16": tiny_distill_1gpu_bf16_config,
    "tiny_gpu_fp8": tiny_distill_1gpu_fp8_config,
    "qwen25_1p5b_h100_bf16": qwen25_1p5b_distill_64gpu_h100_bf16_config,
    "qwen25_1p5b_h100_fp8": qwen25_1p5b_distill_64gpu_h100_fp8_config,
}
