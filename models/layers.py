"""Building blocks shared by the models: RMSNorm, rotary embedding, masks, GQA attention, SwiGLU MLP,
and the KV cache. Each calls the op through the `kernels` package, which runs Triton or PyTorch as the
process's backend setting says (`kernels.use_backend`); no layer holds a backend of its own.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

try:  # flash-attn is an optional extra ("gpu"); used on CUDA for causal attention and packed rows.
    from flash_attn import flash_attn_func as _flash_attn_func
    from flash_attn import flash_attn_varlen_func as _flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = _flash_attn_varlen_func = None


def flash_attn_usable(x: torch.Tensor) -> bool:
    """flash-attn runs here: installed, a CUDA tensor, half precision."""
    return _flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


class PackedRows(NamedTuple):
    """Packed training rows (contiguous segments) in place of a dense [B, 1, T, T] mask: each token's
    sequence start [B, T] (int32; the MLA kernel's packed mode) and, for flash-attn's varlen kernel, the
    flattened rows' cumulative sequence lengths [n + 1] (int32) and the longest sequence."""

    seq_start: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0


def packed_rows(segment_ids: torch.Tensor, with_cu_seqlens: bool) -> PackedRows:
    seq_start = kernels.seq_start_from_segments(segment_ids)
    if not with_cu_seqlens:
        return PackedRows(seq_start)
    b, t = seq_start.shape
    is_start = (seq_start == torch.arange(t, device=seq_start.device)).flatten()
    total = torch.tensor([b * t], device=seq_start.device)
    cu = torch.cat([is_start.nonzero().squeeze(1), total]).to(torch.int32)
    return PackedRows(seq_start, cu, int((cu[1:] - cu[:-1]).max()))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction (Peng et al. 2023; DeepSeek-V2's yarn_get_mscale)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    """YaRN frequencies: dimensions that rotate fast keep their frequency (extrapolate), slow ones are
    divided by `factor` (interpolate), with a linear ramp between the beta_fast and beta_slow rotation
    counts over the original context. Returns (inv_freq, the factor applied to cos/sin)."""
    factor = float(scaling["factor"])
    original = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def dim_for(rotations: float) -> float:  # the dimension index that turns `rotations` times over `original`
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for arbitrary position ids (packed sequences, cache offsets); optional YaRN scaling."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        if scaling is None:
            inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            self.attention_factor = 1.0
        else:
            inv_freq, self.attention_factor = yarn_inv_freq(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 outer product, as transformers does, so positions beyond 2^11 stay exact.
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


class LayerCache:
    """Preallocated per-layer buffers for generation, written along one time axis. A subclass names its
    buffer lists (BUFFERS, one list per kind, one tensor per layer) and the axis (TIME_DIM)."""

    BUFFERS: tuple[str, ...] = ()
    TIME_DIM = 1
    NAME = "cache"

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0  # tokens already stored (same for every layer once a forward finishes)

    def update(self, layer: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write this step's tensors (one per kind, in BUFFERS order) after the stored ones; return each
        kind's whole stored sequence for the layer."""
        d = self.TIME_DIM
        start, end = self.length, self.length + new[0].shape[d]
        if end > self.max_len:
            raise ValueError(f"{self.NAME} holds {self.max_len} positions; this step needs {end}")
        out = []
        for name, x in zip(self.BUFFERS, new):
            buf = getattr(self, name)[layer]
            buf.narrow(d, start, end - start).copy_(x)
            out.append(buf.narrow(d, 0, end))
        return tuple(out)

    def advance(self, n: int) -> None:
        self.length += n

    def buffers(self) -> list[torch.Tensor]:
        """Every buffer, each [B, ..., max_len (at TIME_DIM), ...] (for continuous batching)."""
        return [t for name in self.BUFFERS for t in getattr(self, name)]

    def rows(self, n: int):
        """A cache over the first n rows, sharing this one's storage."""
        view = copy.copy(self)
        for name in self.BUFFERS:
            setattr(view, name, [t[:n] for t in getattr(self, name)])
        return view


class KVCache(LayerCache):
    """Per layer: keys and values [B, H_kv, max_len, D]."""

    BUFFERS, TIME_DIM, NAME = ("k", "v"), 2, "KV cache"

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        super().__init__(max_len)
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def build_attention_mask(
    q_len: int,
    kv_len: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean mask [B or 1, 1, q_len, kv_len] (True = may attend), or None for plain causal.

    Queries are the last q_len of kv_len positions (a KV cache in front). `attention_mask` [B, kv_len]
    marks real tokens (1) and padding (0); `segment_ids` [B, q_len] keeps packed documents apart.
    Every query may always see itself, so rows of padding never turn into NaN.
    """
    if attention_mask is None and segment_ids is None and (q_len == kv_len or q_len == 1):
        return None  # the fast paths: causal SDPA/flash, or one new token that sees the whole cache
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # [1, 1, q, kv]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    if segment_ids is not None:
        if offset:
            raise ValueError("segment_ids are for training on packed rows, not with a KV cache")
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask = mask & same[:, None]
    return mask | (k_pos == q_pos)[None, None]


class Attention(nn.Module):
    """Grouped-query attention with q/k/v bias (Qwen2), RoPE, SDPA, optional KV cache."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        d, h = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = h
        self.q_proj = nn.Linear(d, self.num_heads * h, bias=True)
        self.k_proj = nn.Linear(d, self.num_kv_heads * h, bias=True)
        self.v_proj = nn.Linear(d, self.num_kv_heads * h, bias=True)
        self.o_proj = nn.Linear(self.num_heads * h, d, bias=False)

    def forward(self, x, cos, sin, mask=None, kv_cache: KVCache | None = None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = kernels.apply_rope(q, k, cos, sin, layout="half")
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        out = attention(q, k, v, mask, causal=mask is None and k.shape[2] == t)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def attention(q, k, v, mask, causal: bool):
    """Scaled dot-product attention with GQA: q [B, Hq, T, D], k/v [B, Hkv, S, D]. `mask`: boolean
    [B or 1, 1, T, S], None, or PackedRows (flash-attn's varlen kernel when it has cu_seqlens)."""
    if isinstance(mask, PackedRows):
        if mask.cu_seqlens is not None and _flash_attn_varlen_func is not None:
            b, h, t, d = q.shape
            flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]
            cu, n = mask.cu_seqlens, mask.max_seqlen
            out = _flash_attn_varlen_func(*flat, cu, cu, n, n, causal=True)
            return out.view(b, t, h, d).transpose(1, 2)
        mask = kernels.sequence_mask(mask.seq_start)
    if flash_attn_usable(q) and mask is None:
        out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]  # SDPA shares each KV head across its query group without copies
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa)


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))
