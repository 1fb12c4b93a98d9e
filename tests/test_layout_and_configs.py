"""Config validation: parallel layouts, model/optimizer/loop fields, FP8 requests, dotted overrides."""

import dataclasses

import pytest

from dcd_megatron.configs import apply_overrides, from_dict, load_config, to_dict
from dcd_megatron.configs.overrides import ConfigError
from dcd_megatron.model.config import ModelConfig
from dcd_megatron.model.fp8 import FP8Error, check_fp8
from dcd_megatron.runtime.layout import LayoutError, ParallelConfig, validate_layout


def _validate(parallel, world=4, **kw):
    args = dict(
        world_size=world, num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=176, seq_length=64,
        global_batch_size=8, micro_batch_size=2, has_te=False,
    )
    args.update(kw)
    return validate_layout(parallel, **args)


def test_layout_fills_in_data_parallel():
    layout = _validate(ParallelConfig(tp=2, pp=1), world=4)
    assert (layout.tp, layout.pp, layout.cp, layout.dp) == (2, 1, 1, 2)
    assert layout.world_size == 4


@pytest.mark.parametrize(
    "parallel, kw, needle",
    [
        (ParallelConfig(tp=3), {}, "world size 4 is not divisible"),
        (ParallelConfig(tp=4), {"world": 4, "num_attention_heads": 6}, "must divide model.num_attention_heads"),
        (ParallelConfig(tp=4), {"world": 4}, "must divide model.num_query_groups=2"),
        (ParallelConfig(tp=2), {"world": 2, "ffn_hidden_size": 171}, "must divide model.ffn_hidden_size=171"),
        (ParallelConfig(pp=4), {"world": 4, "num_layers": 6}, "must divide model.num_layers"),
        (ParallelConfig(cp=2), {"world": 2}, "Transformer Engine"),
        (ParallelConfig(cp=2), {"world": 2, "has_te": True, "seq_length": 6}, r"divisible by 2\*cp"),
        (ParallelConfig(tp=1), {"world": 4, "global_batch_size": 6}, "multiple of"),
        (ParallelConfig(tp=2, sequence_parallel=True), {"world": 2}, "sequence_parallel needs Transformer Engine"),
        (ParallelConfig(tp=4, sequence_parallel=True), {"world": 4, "num_query_groups": 4, "has_te": True, "seq_length": 66},
         "divisible by tp for sequence_parallel"),
    ],
)
def test_impossible_layouts_name_the_problem(parallel, kw, needle):
    with pytest.raises(LayoutError, match=needle):
        _validate(parallel, **kw)


def test_parallel_config_fields_are_checked():
    with pytest.raises(LayoutError, match="parallel.tp"):
        ParallelConfig(tp=0)
    with pytest.raises(LayoutError, match="sequence_parallel"):
        ParallelConfig(tp=1, sequence_parallel=True)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"num_layers": 0}, "model.num_layers"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "model.hidden_size"),
        ({"num_query_groups": 3}, "model.num_query_groups"),
        ({"rotary_percent": 0.0}, "model.rotary_percent"),
        ({"kv_channels": 7}, "RoPE rotates channel pairs: .* = 7 channels must be even"),
        ({"hidden_size": 64, "rotary_percent": 0.01}, "must be even and >= 2"),
        ({"hidden_dropout": 1.0}, "model.hidden_dropout"),
        ({"fp8": "hybrid"}, "params_dtype=bf16"),
    ],
)
def test_model_config_names_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**kw)


def test_init_checkpoint_of_another_architecture_is_refused_naming_the_fields(tmp_path):
    import json

    import yaml

    from dcd_megatron.checkpoint import write_manifest
    from dcd_megatron.recipes import tiny_distill_1cpu_fp32_config
    from dcd_megatron.train.setup import _checked_init_checkpoint

    saved = tiny_distill_1cpu_fp32_config()
    iter_dir = tmp_path / "run" / "checkpoints" / "iter_0000005"
    iter_dir.mkdir(parents=True)
    (iter_dir / "meta.json").write_text(json.dumps({"step": 5, "config": yaml.safe_dump(to_dict(saved))}))
    write_manifest(iter_dir)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter_0000005")
    same = apply_overrides(saved, [f"model.init_checkpoint={tmp_path / 'run'}"])
    assert _checked_init_checkpoint(same) == iter_dir  # a run dir resolves to its latest checkpoint
    deeper = apply_overrides(same, ["model.num_layers=3", "model.ffn_hidden_size=256"])
    with pytest.raises(ConfigError, match=r"another architecture \(num_layers: 3 vs 2; ffn_size: 256 vs 192: this config vs the checkpoint"):
        _checked_init_checkpoint(deeper)
    with pytest.raises(FileNotFoundError, match="holds no dcd-train checkpoint"):
        _checked_init_checkpoint(apply_overrides(saved, [f"model.init_checkpoint={tmp_path / 'nothing'}"]))


def test_vocab_padding_follows_tp():
    cfg = ModelConfig(make_vocab_size_divisible_by=16)
    assert cfg.padded_vocab_size(18, 1) == 32
    assert cfg.padded_vocab_size(18, 2) == 32
    assert cfg.padded_vocab_size(40, 4) == 64
    qwen = ModelConfig(make_vocab_size_divisible_by=128)
    assert qwen.padded_vocab_size(151936, 1) == 151936  # 128 * 1187
    assert qwen.padded_vocab_size(151936, 8) == 152576  # next multiple of 1024


@pytest.mark.parametrize(
    "fp8, recipe, te, cap, needle",
    [
        ("hybrid", "delayed", False, None, "needs an NVIDIA GPU"),
        ("hybrid", "delayed", False, (9, 0), "Transformer Engine"),
        ("hybrid", "mxfp8", True, (9, 0), "Blackwell"),
        ("hybrid", "blockwise", True, (10, 0), "Hopper"),
        ("e4m3", "tensorwise", True, (8, 0), "sm89"),
    ],
)
def test_fp8_requests_fail_at_config_time(fp8, recipe, te, cap, needle):
    with pytest.raises(FP8Error, match=needle):
        check_fp8(fp8, recipe, has_te=te, capability=cap)


def test_fp8_accepted_where_it_runs():
    check_fp8(None, "delayed", has_te=False, capability=None)
    check_fp8("hybrid", "blockwise", has_te=True, capability=(9, 0))
    check_fp8("hybrid", "mxfp8", has_te=True, capability=(10, 0))
    check_fp8("hybrid", "tensorwise", has_te=True, capability=(8, 9))


def test_overrides_round_trip_and_errors(tmp_path):
    from dcd_megatron.recipes import tiny_distill_1cpu_fp32_config
    from dcd_megatron.configs.train import ALIASES, TrainConfig

    cfg = tiny_distill_1cpu_fp32_config()
    new = apply_overrides(cfg, ["tp=2", "loss.tau=0.5", "train.steps=7", "model.fp8=null"], aliases=ALIASES)
    assert new.parallel.tp == 2 and new.loss.tau == 0.5 and new.train.steps == 7
    assert cfg.parallel.tp == 1  # the original is untouched
    assert from_dict(TrainConfig, to_dict(new)) == new
    with pytest.raises(ConfigError, match="unknown key train.stepz"):
        apply_overrides(cfg, ["train.stepz=3"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(cfg, ["train.steps"])
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        apply_overrides(cfg, ["train.steps=1.5"])
    with pytest.raises(ValueError, match="train.steps must be >= 1"):
        apply_overrides(cfg, ["train.steps=0"])
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(to_dict(new)))
    assert load_config(TrainConfig, path, ["seed=9"], aliases=ALIASES).train.seed == 9
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainConfig, tmp_path / "missing.yaml")


def test_train_config_checks_cross_section_limits():
    from dcd_megatron.recipes import tiny_distill_1cpu_fp32_config

    cfg = tiny_distill_1cpu_fp32_config()
    with pytest.raises(ValueError, match="exceeds model.max_position_embeddings"):
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_length=4096))


def test_every_recipe_builds_a_valid_config():
    from dcd_megatron.recipes import RECIPES
    from dcd_megatron.configs.train import TrainConfig

    for name, fn in RECIPES.items():
        cfg = fn()
        assert isinstance(cfg, TrainConfig), name
        assert from_dict(TrainConfig, to_dict(cfg)) == cfg, name


@pytest.mark.parametrize("overrides, reader", [
    (["loss.method=gated", "loss.gate=entropy"], "loss.gate=entropy"),
    (["loss.term=topk_kl"], "loss.term=topk_kl"),
])
def test_teacher_top_k_readers_need_data_topk(overrides, reader):
    """Refused at config time (one line naming the fix), not at the first batch."""
    from dcd_megatron.recipes import tiny_distill_1cpu_fp32_config

    cfg = tiny_distill_1cpu_fp32_config()
    with pytest.raises(ValueError, match=rf"^{reader} reads the teacher's top-k, but data.topk=0 keeps none: set data.topk=K") as err:
        apply_overrides(cfg, overrides)
    assert "\n" not in str(err.value)
    assert apply_overrides(cfg, [*overrides, "data.topk=4"]).data.topk == 4
    assert apply_overrides(cfg, ["loss.method=sigmoid", "loss.gate=entropy"]).loss.gate == "entropy"  # sigmoid never reads the gate


def test_dcd_train_exits_2_with_one_line_when_the_entropy_gate_has_no_topk():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "dcd_megatron.cli.train", "--recipe", "tiny_cpu", "loss.method=gated", "loss.gate=entropy"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert errors == [
        "dcd-train: error: loss.gate=entropy reads the teacher's top-k, but data.topk=0 keeps none: set data.topk=K "
        "(traces scored with `dcd-score --top-k K`), or use loss.term=nll / loss.gate=token"
    ], proc.stderr
