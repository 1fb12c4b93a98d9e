"""The project's GPTModel forward (RMSNorm, SwiGLU, RoPE, GQA, optional QKV bias) in plain torch, with a KV cache.

Megatron's GPTModel recomputes the whole prefix at every decoding step (O(T^2) for a T-token
answer), so `dcd-eval` and the drift lab decode with this small re-implementation over the
same weight tensors (no copy: same device and dtype), which caches keys and values per row.
It reads the local-spec and the Transformer Engine parameter names. `max_logit_difference`
checks it against megatron's own forward; its users run that check at every load.
It is an `IncrementalDecoder` for `sampling.generation.sample` (and `eval.generation.generate`) and also callable as a `ModelFn`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _first(sd: dict, *names: str) -> torch.Tensor:
    """The first of ``names`` present in ``sd`` (parameter names differ between layer specs)."""
    for name in names:
        if name in sd:
            return sd[name]
    raise KeyError(f"none of {names} in the model's state dict: not a GPTModel this decoder knows")


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    proj: torch.Tensor
    ln2: torch.Tensor
    fc1: torch.Tensor
    fc2: torch.Tensor


@dataclass
class KVState:
    """Per-layer key/value caches ``[b, groups, T, head_dim]`` and each row's filled length."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor  # [b] tokens held per row (right-padded rows)


class KVCachedGPT:
    """Inference-only copy of a trained GPTModel (TP=1, no pipeline): full forward or KV-cached steps."""

    def __init__(self, state_dict: dict, model_cfg, vocab_size: int):
        sd = {k: v.detach() for k, v in state_dict.items() if torch.is_tensor(v)}
        self.num_heads = model_cfg.num_attention_heads
        self.groups = model_cfg.query_groups
        self.head_dim = model_cfg.kv_channels or model_cfg.hidden_size // self.num_heads
        self.eps = model_cfg.norm_epsilon
        self.vocab_size = vocab_size
        self.embed = sd["embedding.word_embeddings.weight"]
        self.device = self.embed.device
        self.out = sd.get("output_layer.weight", self.embed)
        self.final_ln = sd["decoder.final_layernorm.weight"]
        self.layers = []
        for i in range(model_cfg.num_layers):
            p = f"decoder.layers.{i}."
            self.layers.append(_Layer(
                # local spec: separate norm modules; TE spec: the norm is fused into the next linear
                ln1=_first(sd, p + "input_layernorm.weight", p + "self_attention.linear_qkv.layer_norm_weight"),
                qkv=sd[p + "self_attention.linear_qkv.weight"],
                qkv_bias=sd.get(p + "self_attention.linear_qkv.bias"),
                proj=sd[p + "self_attention.linear_proj.weight"],
                ln2=_first(sd, p + "pre_mlp_layernorm.weight", p + "mlp.linear_fc1.layer_norm_weight"),
                fc1=sd[p + "mlp.linear_fc1.weight"],
                fc2=sd[p + "mlp.linear_fc2.weight"],
            ))
        rot_dim = int(self.head_dim * model_cfg.rotary_percent)
        base = float(int(model_cfg.rotary_base))  # the builder passes int(rotary_base) to megatron
        self.inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=self.device) / rot_dim))
        self.rot_dim = rot_dim

    @classmethod
    def from_loaded(cls, loaded) -> KVCachedGPT:
        """From `model.inference.LoadedModel` (a megatron GPTModel and its TrainConfig)."""
        return cls(loaded.module.state_dict(), loaded.config.model, loaded.vocab_size)

    # ---- pieces ---------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in fp32 whatever the weights' dtype, as megatron's norms do
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [b, heads, t, hd], pos [b, t]: megatron's non-interleaved rotary embedding."""
        freqs = pos.float().unsqueeze(-1) * self.inv_freq  # [b, t, rot/2]
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [b, 1, t, rot]
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim :]
        half = self.rot_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return torch.cat([rot * cos + rotated * sin, rest], dim=-1)

    def _qkv(self, layer: _Layer, h: torch.Tensor, pos: torch.Tensor):
        b, t, _ = h.shape
        qkv = F.linear(h, layer.qkv, layer.qkv_bias)
        per_group = self.num_heads // self.groups
        qkv = qkv.view(b, t, self.groups, (per_group + 2) * self.head_dim)
        q, k, v = qkv.split([per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [b, groups, t, hd]
        return self._rope(q, pos), self._rope(k, pos), v

    def _attend(self, q, k, v, mask) -> torch.Tensor:
        rep = self.num_heads // self.groups
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, _, t, _ = out.shape
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)

    def _mlp(self, layer: _Layer, h: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(h, layer.fc1).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.fc2)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms(x, self.final_ln), self.out)[..., : self.vocab_size].float()

    # ---- full forward (a ModelFn) -----------------------------------------------------------
    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[b, t, V]`` of a causal forward over ``tokens`` ``[b, t]``."""
        logits, _ = self._forward_full(tokens.to(self.device))
        return logits

    def _forward_full(self, tokens: torch.Tensor):
        b, t = tokens.shape
        pos = torch.arange(t, device=self.device).unsqueeze(0).expand(b, t)
        mask = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        x = F.embedding(tokens, self.embed)
        keys, values = [], []
        for layer in self.layers:
            q, k, v = self._qkv(layer, self._rms(x, layer.ln1), pos)
            keys.append(k)
            values.append(v)
            x = x + F.linear(self._attend(q, k, v, mask), layer.proj)
            x = x + self._mlp(layer, self._rms(x, layer.ln2))
        return self._head(x), (keys, values)

    # ---- incremental decoding (an IncrementalDecoder) --------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, KVState]:
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        buf = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            buf[i, : len(p)] = p.to(self.device)
        logits, (keys, values) = self._forward_full(buf)  # causal: right padding never reaches a row
        last = logits[torch.arange(len(prompts), device=self.device), lengths - 1]
        return last, KVState(keys, values, lengths)

    @torch.no_grad()
    def step(self, state: KVState, tokens: torch.Tensor) -> tuple[torch.Tensor, KVState]:
        tokens = tokens.to(self.device)
        b = tokens.shape[0]
        rows = torch.arange(b, device=self.device)
        pos = state.lengths.unsqueeze(1)  # [b, 1]: the new token's position
        width = int(state.lengths.max()) + 1
        keys, values = state.keys, state.values
        if keys[0].shape[2] < width:  # grow every cache by a block of positions
            grow = max(16, width - keys[0].shape[2])
            keys = [torch.cat([k, k.new_zeros(*k.shape[:2], grow, k.shape[3])], dim=2) for k in keys]
            values = [torch.cat([v, v.new_zeros(*v.shape[:2], grow, v.shape[3])], dim=2) for v in values]
        cap = keys[0].shape[2]
        mask = (torch.arange(cap, device=self.device).unsqueeze(0) <= state.lengths.unsqueeze(1)).view(b, 1, 1, cap)
        x = F.embedding(tokens.unsqueeze(1), self.embed)  # [b, 1, h]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, self._rms(x, layer.ln1), pos)
            keys[i][rows, :, state.lengths] = k[:, :, 0]
            values[i][rows, :, state.lengths] = v[:, :, 0]
            x = x + F.linear(self._attend(q, keys[i], values[i], mask), layer.proj)
            x = x + self._mlp(layer, self._rms(x, layer.ln2))
        return self._head(x)[:, 0], KVState(keys, values, state.lengths + 1)

    def select(self, state: KVState, rows: torch.Tensor) -> KVState:
        rows = rows.to(self.device)
        return KVState([k[rows] for k in state.keys], [v[rows] for v in state.values], state.lengths[rows])


def max_logit_difference(kv: KVCachedGPT, loaded, bos_id: int | None, *, rows: int = 4, length: int = 48):
    """``(max |kv - megatron|, max |megatron|)`` over the logits of random probe tokens.

    ``loaded.logits`` is megatron's own forward. Run at every load: a megatron-core upgrade
    that changes the forward must not go unnoticed.
    """
    length = min(length, loaded.config.model.max_position_embeddings)
    probe = torch.randint(3, loaded.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    if bos_id is not None:
        probe[:, 0] = bos_id
    reference = loaded.logits(probe).to(kv.device)
    return float((kv(probe) - reference).abs().max()), float(reference.abs().max())
