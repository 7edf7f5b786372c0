"""Rotary position embedding applied to queries and keys.

Two layouts:
- ``half`` (Qwen, LLaMA): the head dim is split into two halves that rotate together,
  ``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``;
- ``interleaved`` (DeepSeek's rope dims): pairs (x[2i], x[2i+1]) rotate together.

``cos``/``sin`` have shape [batch, seq, head_dim] (one row per position id, so packed sequences and
KV-cache offsets are just different position ids), in the half layout: ``cat(freqs, freqs)``.
q is [batch, q_heads, seq, head_dim] and k is [batch, k_heads, seq, head_dim]; head counts may
differ (GQA, MLA's single shared rope key).
"""

from __future__ import annotations

import torch

LAYOUTS = ("half", "interleaved")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # cos/sin arrive in the half layout; pair i uses frequency i.
    d = x.shape[-1]
    c = cos[..., : d // 2]
    s = sin[..., : d // 2]
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x_even * c - x_odd * s, x_odd * c + x_even * s), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half"
) -> tuple[torch.Tensor, torch.Tensor]:
    if layout not in LAYOUTS:
        raise ValueError(f"rope layout must be one of {LAYOUTS}, got {layout!r}")
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    fn = _rope_half if layout == "half" else _rope_interleaved
    return fn(q, cos, sin), fn(k, cos, sin)
