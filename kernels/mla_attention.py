"""Multi-head Latent Attention (DeepSeek-V2/V3): the attention step, in two forms.

Training / prefill (`mla_attention`): every score is ``q_nope . k_nope + q_rope . k_rope`` where the
rope key is one head shared by all query heads, and the value head dim may differ from the query/key
head dim. Shapes: q_nope [B, H, T, Dn], q_rope [B, H, T, Dr], k_nope [B, H, S, Dn], k_rope [B, 1, S, Dr],
v [B, H, S, Dv] -> [B, H, T, Dv].

Decoding over the latent cache (`mla_decode`), after weight absorption: the queries have been
multiplied into the latent space (q_latent = q_nope @ W_uk, [B, H, T, R]) and attend over the cached
latents c_kv [B, S, R] and rope keys k_rope [B, S, Dr]; the latent itself is the value, so this is
multi-query attention with one KV head of width R + Dr. Returns the attention-weighted latent
[B, H, T, R] (the caller applies W_uv and o_proj).

`mask` is boolean, True where a query may attend, broadcastable to [B, H, T, S]; None means causal with
the queries being the last T of S positions. The PyTorch references below are the fallback and the
oracle for the Triton kernels in kernels/mla_attention_triton.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _causal(mask: torch.Tensor | None, t: int, s: int) -> bool:
    return mask is None and t == s


def seq_start_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, total] position of the first token of each token's sequence, from cumulative lengths [n + 1]."""
    pos = torch.arange(total, device=cu_seqlens.device)
    which = torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)
    return cu_seqlens[which].to(torch.int32)[None]


def seq_start_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] int32 position of the first token of each token's segment, for packed rows whose segments are
    contiguous runs of one id (as packing writes them): the same attention as the segment mask, without it."""
    b, t = segment_ids.shape
    pos = torch.arange(t, device=segment_ids.device).expand(b, t)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.where(starts, pos, 0).cummax(dim=1).values.to(torch.int32)


def sequence_mask(seq_start: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean mask of packed sequences: causal, and no key before the query's sequence start."""
    t = seq_start.shape[-1]
    pos = torch.arange(t, device=seq_start.device)
    return ((pos[None, :] <= pos[:, None]) & (pos[None, None, :] >= seq_start[..., :, None]))[:, None]


def mla_attention_reference(q_nope, q_rope, k_nope, k_rope, v, scale: float, mask=None, seq_start=None):
    if seq_start is not None:
        mask = sequence_mask(seq_start.expand(q_nope.shape[0], -1))
    h = q_nope.shape[1]
    q = torch.cat((q_nope, q_rope), dim=-1)
    k = torch.cat((k_nope, k_rope.expand(-1, h, -1, -1)), dim=-1)
    t, s = q.shape[2], k.shape[2]
    if mask is None and t != s and t != 1:
        raise ValueError("mla_attention: pass a mask when queries are not the whole key range or one token")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=_causal(mask, t, s), scale=scale)


def mla_decode_reference(q_latent, q_rope, c_kv, k_rope, scale: float, mask=None) -> torch.Tensor:
    q = torch.cat((q_latent, q_rope), dim=-1)  # [B, H, T, R + Dr]
    k = torch.cat((c_kv, k_rope), dim=-1).unsqueeze(1)  # [B, 1, S, R + Dr]
    v = c_kv.unsqueeze(1)  # [B, 1, S, R]
    t, s = q.shape[2], k.shape[2]
    if mask is None and t != s and t != 1:
        raise ValueError("mla_decode: pass a mask when queries are not the whole key range or one token")
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=_causal(mask, t, s), scale=scale, enable_gqa=q.shape[1] > 1
    )
