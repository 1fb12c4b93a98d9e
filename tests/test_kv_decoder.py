"""The KV-cached decoder (model/kv_decoder.py) against megatron's GPTModel, and dcd-eval's use of it.

Converted tiny Hugging Face models of both architectures (Llama untied; Qwen2 tied with QKV
bias) are loaded with megatron; the decoder must give megatron's logits (fp32, within 1e-4)
and the same greedy text, and dcd-eval on a checkpoint must write the same generations with
the KV cache (the default) as with --recompute (megatron's forward at every token).
"""

import json
import logging

import pytest
import torch

pytestmark = pytest.mark.megatron


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from dcd_megatron.convert import convert_hf_to_mcore
    from dcd_megatron.convert.tiny import make_tiny_hf_model
    from dcd_megatron.lab import task

    root = tmp_path_factory.mktemp("kv")
    task.build_tokenizer(root / "tok")
    out = {}
    for arch, tied in (("llama", False), ("qwen2", True)):
        hf = make_tiny_hf_model(root / f"{arch}-hf", arch=arch, tokenizer_dir=root / "tok", tied=tied,
                                num_layers=2, rope_theta=1e6 if arch == "qwen2" else 1e4, seed=5)
        out[arch] = convert_hf_to_mcore(hf, root / arch).checkpoint
    return out


def _load(ckpt):
    from dcd_megatron.model.inference import load_trained_model

    return load_trained_model(ckpt, device="cpu")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_and_greedy_text_match_megatron(checkpoints, arch):
    from dcd_megatron.eval.generation import generate
    from dcd_megatron.model.kv_decoder import KVCachedGPT, max_logit_difference

    loaded, tok = _load(checkpoints[arch])
    kv = KVCachedGPT.from_loaded(loaded)
    diff, scale = max_logit_difference(kv, loaded, tok.bos_id)
    assert diff < 1e-4 and scale > 0.1, (diff, scale)
    prompts = [[tok.bos_id] + tok.encode(p) for p in ("12:", "9071:", "4:", "55555:")]  # different lengths
    common = dict(max_new_tokens=12, eos_id=tok.eos_id, batch_size=3, progress=False)
    assert generate(kv, prompts, **common) == generate(loaded.logits, prompts, **common)


def test_bf16_weights_are_used_in_place_not_copied(checkpoints):
    from dcd_megatron.model.kv_decoder import KVCachedGPT

    loaded, tok = _load(checkpoints["qwen2"])
    tokens = torch.tensor([[tok.bos_id] + tok.encode("12:1+2=3>3")])
    reference = KVCachedGPT.from_loaded(loaded)(tokens)
    loaded.module.to(torch.bfloat16)
    kv = KVCachedGPT.from_loaded(loaded)
    embedding = loaded.module.embedding.word_embeddings.weight
    assert kv.embed.dtype == torch.bfloat16 and kv.embed.data_ptr() == embedding.data_ptr()
    logits = kv(tokens)
    assert logits.dtype == torch.float32
    assert float((logits - reference).abs().max()) < 3e-2 * float(reference.abs().max())


def test_transformer_engine_parameter_names_give_the_same_model(checkpoints):
    """TE's layer spec fuses each norm into the next linear (`...layer_norm_weight`)."""
    from dcd_megatron.model.kv_decoder import KVCachedGPT

    loaded, tok = _load(checkpoints["llama"])
    local = loaded.module.state_dict()
    te = {}
    for key, value in local.items():
        key = key.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        te[key.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")] = value
    assert te.keys() != local.keys()
    tokens = torch.tensor([[tok.bos_id] + tok.encode("907:9+0+7=16>16")])
    model_cfg = loaded.config.model
    assert torch.equal(KVCachedGPT(te, model_cfg, loaded.vocab_size)(tokens), KVCachedGPT(local, model_cfg, loaded.vocab_size)(tokens))
    del te["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"]
    with pytest.raises(KeyError, match="not a GPTModel this decoder knows"):
        KVCachedGPT(te, model_cfg, loaded.vocab_size)


def test_a_decoder_that_disagrees_with_megatron_is_not_used(checkpoints, monkeypatch, caplog):
    from dcd_megatron.eval.student import decoder_for
    from dcd_megatron.model.kv_decoder import KVCachedGPT

    loaded, tok = _load(checkpoints["llama"])
    assert isinstance(decoder_for(loaded, tok.bos_id), KVCachedGPT)
    assert decoder_for(loaded, tok.bos_id, recompute=True) == loaded.logits
    monkeypatch.setattr(KVCachedGPT, "_head", lambda self, x: torch.zeros(*x.shape[:-1], self.vocab_size))
    with caplog.at_level(logging.WARNING):
        assert decoder_for(loaded, tok.bos_id) == loaded.logits
    assert "differs from megatron's forward" in caplog.text


def test_dcd_eval_on_a_checkpoint_writes_the_same_generations_with_and_without_the_cache(checkpoints, tmp_path, caplog):
    from pathlib import Path

    from dcd_megatron.eval import cli

    data = Path(__file__).parent / "data" / "eval" / "gsm8k.jsonl"
    outputs = {}
    for mode, extra in (("kv", []), ("recompute", ["--recompute"])):
        out = tmp_path / mode
        argv = ["--benchmark", f"gsm8k={data}", "--checkpoint", str(checkpoints["qwen2"]), "--device", "cpu",
                "--max-new-tokens", "10", "--protocol", "greedy", "--template", "plain",
                "--output-dir", str(out), "--no-progress", *extra]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dcd_megatron.eval.student"):
            assert cli.main(argv) == 0
        assert ("decoding with the KV cache" in caplog.text) == (mode == "kv")
        generations = sorted(out.rglob("*.jsonl"))
        assert generations, sorted(out.rglob("*"))
        outputs[mode] = {str(p.relative_to(out)): [json.loads(line) for line in p.read_text().splitlines()]
                         for p in generations}
    assert outputs["kv"] == outputs["recompute"]
    completions = outputs["kv"]["gsm8k/greedy/completions.jsonl"]
    assert len(completions) == 3 and any(r["completion"] for r in completions)
