"""Multi-head Latent Attention (DeepSeek-V2 sec. 2.1, DeepSeek-V3 sec. 2.1.1) and its latent KV cache.

Keys and values are compressed into one latent per token, c_kv = RMSNorm(W_dkv x) of width
kv_lora_rank, from which kv_b_proj reconstructs every head's no-rope key (qk_nope_head_dim) and value
(v_head_dim). Position enters through a separate rope part: each head's query has qk_rope_head_dim
rotated dims, and the key's rope part is one head shared by all (computed from x directly). So a
cache needs only c_kv and the rotated rope key: kv_lora_rank + qk_rope_head_dim values per token and
layer, whatever the head count.

Decoding never rebuilds keys and values. kv_b_proj's key half W_uk is folded into the query
(q_latent = q_nope W_uk, so q_nope . k_nope = q_latent . c_kv), and its value half W_uv is applied
after attention (softmax(...) c_kv W_uv), so attention runs over the cached latents directly.
Parameter names are transformers' DeepseekV3Attention's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import kernels

from .layers import LayerCache, PackedRows, RMSNorm, yarn_mscale


class LatentKVCache(LayerCache):
    """Per layer: the normalised KV latent [B, max_len, R] and the rotated rope key [B, max_len, Dr]."""

    BUFFERS, TIME_DIM, NAME = ("c_kv", "k_rope"), 1, "latent cache"

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_lora_rank: int,
        rope_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__(max_len)
        self.c_kv = [torch.empty(batch, max_len, kv_lora_rank, dtype=dtype, device=device) for _ in range(num_layers)]
        self.k_rope = [torch.empty(batch, max_len, rope_dim, dtype=dtype, device=device) for _ in range(num_layers)]


def mla_softmax_scale(config) -> float:
    scale = config.qk_head_dim**-0.5
    rs = config.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        m = yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
        scale *= m * m
    return scale


class MultiheadLatentAttention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads = c.num_attention_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = (
            c.qk_nope_head_dim,
            c.qk_rope_head_dim,
            c.v_head_dim,
        )
        self.kv_lora_rank = c.kv_lora_rank
        self.scale = mla_softmax_scale(c)
        q_out = self.num_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.num_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * c.v_head_dim, c.hidden_size, bias=False)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x, cos, sin, mask=None, kv_cache: LatentKVCache | None = None):
        """`mask`: a boolean mask [B, 1, T, S], None (causal), or for packed training rows PackedRows (its
        sequence starts go to the kernel's packed mode: no [B, 1, T, T] mask)."""
        b, t, _ = x.shape
        nope, rope, v_dim = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        q = self._query(x).view(b, t, self.num_heads, nope + rope).transpose(1, 2)
        q_nope, q_rope = q.split([nope, rope], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_rope, k_rope = kernels.apply_rope(q_rope, k_rope.unsqueeze(1), cos, sin, layout="interleaved")
        if kv_cache is None:
            kv = self.kv_b_proj(c_kv).view(b, t, self.num_heads, nope + v_dim).transpose(1, 2)
            k_nope, v = kv.split([nope, v_dim], dim=-1)
            if isinstance(mask, PackedRows):
                out = kernels.mla_attention(q_nope, q_rope, k_nope, k_rope, v, self.scale, seq_start=mask.seq_start)
            else:
                out = kernels.mla_attention(q_nope, q_rope, k_nope, k_rope, v, self.scale, mask)
        else:
            c_all, k_rope_all = kv_cache.update(self.layer_idx, c_kv, k_rope.squeeze(1))
            w = self.kv_b_proj.weight.view(self.num_heads, nope + v_dim, self.kv_lora_rank)
            w_uk, w_uv = w[:, :nope], w[:, nope:]
            q_latent = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)
            latent = kernels.mla_decode(q_latent, q_rope, c_all, k_rope_all, self.scale, mask)
            out = torch.einsum("bhtr,hvr->bhtv", latent, w_uv)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * v_dim))
