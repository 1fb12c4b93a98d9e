"""The packed-sample attention helpers against megatron-core itself (local spec GPTModel, RoPE)."""

from __future__ import annotations

import pytest

from tests.dist import run_ranks

pytestmark = pytest.mark.megatron


def _packed_vs_separate(rank, world_size):
    import torch
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from dcd_megatron.data.masks import packed_causal_mask, packed_seq_params_from_segments

    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    model = GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=50, max_sequence_length=32,
        position_embedding_type="rope",
    ).eval()

    doc_a = torch.randint(0, 50, (5,))
    doc_b = torch.randint(0, 50, (7,))
    pad = torch.zeros(4, dtype=torch.long)
    tokens = torch.cat([doc_a, doc_b, pad])[None]
    segments = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 4])
    reset_positions = torch.cat([torch.arange(5), torch.arange(7), torch.zeros(4, dtype=torch.long)])[None]
    global_positions = torch.arange(16)[None]

    def run(ids, positions, mask):
        with torch.no_grad():
            return model(input_ids=ids, position_ids=positions, attention_mask=mask).float()

    def causal(n):
        return torch.ones(n, n, dtype=torch.bool).triu(1)[None, None]

    alone_a = run(doc_a[None], torch.arange(5)[None], causal(5))[0]
    alone_b = run(doc_b[None], torch.arange(7)[None], causal(7))[0]
    mask = packed_causal_mask(segments)
    out = {}
    for name, positions, m in (
        ("reset", reset_positions, mask),
        ("global", global_positions, mask),
        ("unmasked", reset_positions, causal(16)),
    ):
        packed = run(tokens, positions, m)[0]
        out[name] = (
            float((packed[:5] - alone_a).abs().max()),
            float((packed[5:12] - alone_b).abs().max()),
            bool(torch.isfinite(packed).all()),
        )
    params = packed_seq_params_from_segments(segments)
    out["params"] = (
        params.qkv_format, params.cu_seqlens_q.tolist(), params.cu_seqlens_kv.dtype == torch.int32,
        params.max_seqlen_q, params.max_seqlen_kv,
    )
    return out


def test_packed_mask_matches_separate_documents_in_a_rope_gpt():
    (out,) = run_ranks(_packed_vs_separate, 1)
    for name in ("reset", "global"):  # RoPE is relative: positions inside the mask do not matter
        err_a, err_b, finite = out[name]
        assert err_a < 1e-4 and err_b < 1e-4 and finite, (name, out[name])
    # without the block-diagonal mask the second document sees the first: a real difference
    assert out["unmasked"][0] < 1e-4 and out["unmasked"][1] > 1e-3, out["unmasked"]
    assert out["params"] == ("thd", [0, 5, 12, 16], True, 7, 7)
