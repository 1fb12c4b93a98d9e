"""dcd-convert: HF Llama/Qwen2 <-> our megatron checkpoints, checked against transformers' forward pass.

Tolerance: megatron's logits must match transformers' eager attention to 1e-5 (fp32); at TP=1
they are measured bit-identical on CPU, at TP=2 the row-parallel sums reorder additions.
"""

import json

import pytest
import torch

from tests.dist import run_ranks

pytestmark = pytest.mark.megatron

ATOL = 1e-5
CASES = {"llama": dict(arch="llama", tied=False), "qwen2": dict(arch="qwen2", tied=True)}


def _hf_logits(hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random HF models (Llama: GQA, untied; Qwen2: GQA, QKV bias, tied), converted once."""
    from dcd_megatron.convert import convert_hf_to_mcore
    from dcd_megatron.convert.tiny import make_tiny_hf_model
    from dcd_megatron.lab import task

    root = tmp_path_factory.mktemp("convert")
    task.build_tokenizer(root / "tok")
    out = {}
    for name, kw in CASES.items():
        hf = make_tiny_hf_model(root / f"{name}-hf", tokenizer_dir=root / "tok", rope_theta=5e5 if name == "qwen2" else 1e4, **kw)
        res = convert_hf_to_mcore(hf, root / f"{name}-mcore")
        out[name] = dict(hf=hf, mcore=res.checkpoint, result=res, root=root)
    torch.manual_seed(0)
    tokens = torch.randint(0, res.config.model.vocab_size, (2, 13))
    for entry in out.values():
        entry["tokens"] = tokens
        entry["hf_logits"] = _hf_logits(entry["hf"], tokens)
    return out


# ---- pure mappings --------------------------------------------------------------------------
def test_fused_qkv_interleaves_query_groups_and_splits_back():
    from dcd_megatron.convert import fuse_qkv, split_qkv

    heads, groups, d, hidden = 6, 2, 3, 5
    # each row of a head carries (kind, head, dim) so the fused order can be read back
    def rows(kind, n):
        return torch.tensor([[kind * 100 + h * 10 + j] * hidden for h in range(n) for j in range(d)], dtype=torch.float32)

    q, k, v = rows(1, heads), rows(2, groups), rows(3, groups)
    fused = fuse_qkv(q, k, v, num_heads=heads, num_groups=groups, head_dim=d)
    expected = []
    for g in range(groups):  # megatron: per group [q heads of the group, k, v]
        for h in range(g * heads // groups, (g + 1) * heads // groups):
            expected += [100 + h * 10 + j for j in range(d)]
        expected += [200 + g * 10 + j for j in range(d)] + [300 + g * 10 + j for j in range(d)]
    assert fused[:, 0].tolist() == expected
    for a, b in zip(split_qkv(fused, num_heads=heads, num_groups=groups, head_dim=d), (q, k, v)):
        assert torch.equal(a, b)
    bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], num_heads=heads, num_groups=groups, head_dim=d)
    assert bias.tolist() == expected


def test_gate_up_and_vocab_padding():
    from dcd_megatron.convert import fuse_gate_up, split_gate_up
    from dcd_megatron.convert.tensors import pad_vocab, strip_vocab

    gate, up = torch.randn(4, 3), torch.randn(4, 3)
    fc1 = fuse_gate_up(gate, up)
    assert torch.equal(fc1[:4], gate) and torch.equal(fc1[4:], up)  # SwiGLU: act(first half) * second
    assert all(torch.equal(a, b) for a, b in zip(split_gate_up(fc1), (gate, up)))
    emb = torch.randn(5, 2)
    padded = pad_vocab(emb, 8)
    assert padded.shape == (8, 2) and torch.equal(padded[5:], torch.zeros(3, 2))
    assert torch.equal(strip_vocab(padded, 5), emb)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "RoPE scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unsupported_hf_configs_are_refused_by_name(change, words):
    from dcd_megatron.convert import ConvertError, model_config_from_hf

    base = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 8, "num_attention_heads": 2,
            "intermediate_size": 16, "vocab_size": 10}
    assert model_config_from_hf(base).num_layers == 2
    with pytest.raises(ConvertError, match=words.replace("(", r"\(")):
        model_config_from_hf({**base, **change})


# ---- import -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_imported_checkpoint_matches_transformers_logits(models, name):
    from dcd_megatron.configs import load_config
    from dcd_megatron.model.inference import load_trained_model
    from dcd_megatron.configs.train import TrainConfig

    entry = models[name]
    hf_cfg = json.loads((entry["hf"] / "config.json").read_text())
    model, tok = load_trained_model(entry["mcore"], device="cpu")
    cfg = model.config.model
    assert cfg.num_query_groups == hf_cfg["num_key_value_heads"] < cfg.num_attention_heads  # GQA
    assert cfg.add_qkv_bias is (name == "qwen2")
    assert cfg.untie_embeddings_and_output_weights is (not CASES[name]["tied"])
    assert cfg.rotary_base == (5e5 if name == "qwen2" else 1e4)
    assert tok.vocab_size == cfg.vocab_size == hf_cfg["vocab_size"]
    logits = model.logits(entry["tokens"])
    ref = entry["hf_logits"]
    assert ref.std() > 0.3, "the reference logits are too flat for a meaningful comparison"
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    # the pad rows megatron adds are zero, and training can start from the checkpoint
    emb = model.module.embedding.word_embeddings.weight
    assert emb.shape[0] == entry["result"].padded_vocab_size > cfg.vocab_size
    assert torch.count_nonzero(emb[cfg.vocab_size :]) == 0
    train_cfg = load_config(TrainConfig, entry["mcore"] / "train.yaml")
    assert train_cfg.model.init_checkpoint == str(entry["mcore"])
    assert train_cfg.data.tokenizer == str(entry["hf"] / "tokenizer.json")


# ---- export -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_export_reimport_round_trips_bit_identically(models, name):
    from dcd_megatron.convert import convert_hf_to_mcore, convert_mcore_to_hf
    from dcd_megatron.model.inference import load_trained_model

    entry, root = models[name], models[name]["root"]
    exported = convert_mcore_to_hf(entry["mcore"], root / f"{name}-export")
    original, back = _safetensors(entry["hf"]), _safetensors(exported.out_dir)
    assert sorted(back) == sorted(original)
    assert ("lm_head.weight" in back) is (not CASES[name]["tied"])
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (exported.out_dir / f).read_bytes() == (entry["hf"] / f).read_bytes()
    src, out = (json.loads((d / "config.json").read_text()) for d in (entry["hf"], exported.out_dir))
    for key in ("model_type", "architectures", "num_key_value_heads", "tie_word_embeddings", "vocab_size",
                "bos_token_id", "eos_token_id", "rms_norm_eps"):
        assert out[key] == src[key], key
    torch.testing.assert_close(_hf_logits(exported.out_dir, entry["tokens"]), entry["hf_logits"], atol=0, rtol=0)

    again = convert_hf_to_mcore(exported.out_dir, root / f"{name}-reimport")
    first, second = (load_trained_model(p, device="cpu")[0].module.state_dict() for p in (entry["mcore"], again.checkpoint))
    tensors = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
    assert tensors and all(torch.equal(first[k], second[k]) for k in tensors)


def test_cli_reports_bad_input_in_one_line(models, tmp_path, capsys):
    from dcd_megatron.cli.convert import main

    assert main(["hf-to-mcore", "--hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    entry = models["llama"]
    assert main(["hf-to-mcore", "--hf", str(entry["hf"]), "--out", str(entry["mcore"]), "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "reshards on load" in err
    assert main(["mcore-to-hf", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "y")]) == 2
    assert "holds no dcd-train checkpoint" in capsys.readouterr().err


# ---- other layouts ----------------------------------------------------------------------------
def _load_at_other_layouts(rank, world_size, cases):
    """TP=2: gathered logits vs transformers; PP=2 (untied only): each stage holds the TP=1 layers at its offset."""
    from megatron.core import parallel_state as ps

    from dcd_megatron.convert.model_io import load_megatron_model
    from dcd_megatron.runtime.distributed import init_model_parallel
    from dcd_megatron.runtime.layout import Layout

    cpu = torch.device("cpu")
    out = {name: None for name in cases}
    for name, (ckpt, tokens, ref, tp1_state, untied) in cases.items():
        init_model_parallel(Layout(2, 1, 1, 1), seed=0)
        module, cfg, _, vocab = load_megatron_model(ckpt, layout=Layout(2, 1, 1, 1), device=cpu)
        b, t = tokens.shape
        with torch.no_grad():
            local = module(input_ids=tokens, position_ids=torch.arange(t).expand(b, t), attention_mask=None)
        parts = [torch.empty_like(local) for _ in range(2)]
        torch.distributed.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)[..., :vocab]
        torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)

        if not untied:
            continue  # megatron's tied-embedding sync across stages calls .cuda(); not patched for CPU
        init_model_parallel(Layout(1, 2, 1, 1), seed=0)
        module, cfg, _, _ = load_megatron_model(ckpt, layout=Layout(1, 2, 1, 1), device=cpu)
        per_stage = cfg.model.num_layers // 2
        checked = 0
        for key, value in module.state_dict().items():
            if not isinstance(value, torch.Tensor):
                continue
            global_key = key
            if key.startswith("decoder.layers."):
                _, _, i, rest = key.split(".", 3)
                global_key = f"decoder.layers.{int(i) + rank * per_stage}.{rest}"
            want = tp1_state[global_key]
            assert torch.equal(value[: want.shape[0]], want), (rank, key)
            checked += 1
        out[name] = checked
    return out


def test_one_checkpoint_loads_at_tp2_and_pp2(models):
    from dcd_megatron.model.inference import load_trained_model

    cases = {}
    for name, entry in models.items():
        state = load_trained_model(entry["mcore"], device="cpu")[0].module.state_dict()
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        cases[name] = (str(entry["mcore"]), entry["tokens"], entry["hf_logits"], state, not CASES[name]["tied"])
    results = run_ranks(_load_at_other_layouts, 2, cases)
    # PP=2 (untied Llama): both stages hold their share of layers, the embedding and head
    assert results[0]["llama"] > 0 and results[1]["llama"] > 0


def test_transformer_engine_names_fold_the_norms_into_the_linears():
    """The TE-spec mapping (GPU) uses TE's fused-norm names and round-trips like the local one."""
    from dcd_megatron.convert.tensors import Arch, hf_to_mcore, mcore_to_hf

    arch = Arch(num_layers=2, hidden_size=8, num_heads=4, num_groups=2, head_dim=2, ffn_size=12,
                vocab_size=10, qkv_bias=True, tied=False)
    shapes = {"model.embed_tokens.weight": (10, 8), "lm_head.weight": (10, 8), "model.norm.weight": (8,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (8,), p + "post_attention_layernorm.weight": (8,),
                       p + "self_attn.q_proj.weight": (8, 8), p + "self_attn.k_proj.weight": (4, 8),
                       p + "self_attn.v_proj.weight": (4, 8), p + "self_attn.q_proj.bias": (8,),
                       p + "self_attn.k_proj.bias": (4,), p + "self_attn.v_proj.bias": (4,),
                       p + "self_attn.o_proj.weight": (8, 8), p + "mlp.gate_proj.weight": (12, 8),
                       p + "mlp.up_proj.weight": (12, 8), p + "mlp.down_proj.weight": (8, 12)})
    hf = {k: torch.randn(s) for k, s in shapes.items()}
    te = dict(hf_to_mcore(arch, hf.__getitem__, padded_vocab=16, fused_norms=True))
    assert torch.equal(te["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"], hf["model.layers.1.input_layernorm.weight"])
    assert torch.equal(te["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"], hf["model.layers.0.post_attention_layernorm.weight"])
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in te)
    back = dict(mcore_to_hf(arch, te, fused_norms=True))
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
