"""Rotary position embedding applied to queries and keys.

Two layouts:
- ``half`` (Qwen, LLaMA): the head dim is split into two halves that rotate together,
  ``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``;
- ``interleaved`` (DeepSeek's rope dims): pairs (x[2i], x[2i+1]) rotate together.

``cos``/``sin`` have shape [batch, seq, head_dim] (one row per position id, so packed sequences and
KV-cache offsets are just different position ids), in the half layout: ``cat(freqs, freqs)``.
q is [batch, q_heads, seq, head_dim] and k is [batch, k_heads, seq, head_dim]; head counts may
differ (GQA, MLA's single shared rope key).

Triton: one launch rotates q and k; one program per (batch, position) handles all q heads and all k
heads as [heads, head_dim/2] tiles, computing in fp32. q and k may be strided views (the usual
transpose of [B, T, H, D]); the last dim must be contiguous. The backward is the same kernel with sin
negated (a rotation's inverse is its transpose).
"""

from __future__ import annotations

import torch

from ._triton import tl, triton

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


@triton.jit
def _rotate_tile(
    X,
    OUT,
    base_x,
    base_o,
    stride_xh,
    stride_oh,
    H,
    c,
    s,
    HALF,
    H_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    h = tl.arange(0, H_PAD)[:, None]
    i = tl.arange(0, HALF_PAD)[None, :]
    m = (h < H) & (i < HALF)
    if INTERLEAVED:
        d1 = 2 * i
        d2 = 2 * i + 1
    else:
        d1 = i
        d2 = i + HALF
    x1v = tl.load(X + base_x + h * stride_xh + d1, mask=m, other=0.0)
    x1 = x1v.to(tl.float32)
    x2 = tl.load(X + base_x + h * stride_xh + d2, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + base_o + h * stride_oh + d1, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=m)
    tl.store(OUT + base_o + h * stride_oh + d2, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    T,
    HQ,
    HK,
    HALF,
    sqb,
    sqh,
    sqt,
    skb,
    skh,
    skt,
    sqob,
    sqoh,
    sqot,
    skob,
    skoh,
    skot,
    scb,
    sct,
    sign,
    HQ_PAD: tl.constexpr,
    HK_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    i = tl.arange(0, HALF_PAD)[None, :]
    cm = i < HALF
    c = tl.load(COS + b * scb + t * sct + i, mask=cm, other=0.0).to(tl.float32)
    s = tl.load(SIN + b * scb + t * sct + i, mask=cm, other=0.0).to(tl.float32) * sign
    _rotate_tile(
        Q, QO, b * sqb + t * sqt, b * sqob + t * sqot, sqh, sqoh, HQ, c, s, HALF, HQ_PAD, HALF_PAD, INTERLEAVED
    )
    _rotate_tile(
        K, KO, b * skb + t * skt, b * skob + t * skot, skh, skoh, HK, c, s, HALF, HK_PAD, HALF_PAD, INTERLEAVED
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_rope(q, k, cos, sin, layout: str, sign: float):
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    b, hq, t, d = q.shape
    hk = k.shape[1]
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, seq, head dim")
    if cos.shape[-2:] != (t, d) or cos.shape[0] not in (1, b):
        raise ValueError(f"apply_rope: cos/sin {tuple(cos.shape)} do not fit q {tuple(q.shape)}")
    if sin.stride() != cos.stride():
        sin = sin.contiguous()
        cos = cos.contiguous()
    qo = torch.empty_like(q)
    ko = torch.empty_like(k)
    if q.numel() == 0:
        return qo, ko
    half = d // 2
    cb = cos.stride(0) if cos.shape[0] == b else 0
    _rope_kernel[(b * t,)](
        q,
        k,
        qo,
        ko,
        cos,
        sin,
        t,
        hq,
        hk,
        half,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        qo.stride(0),
        qo.stride(1),
        qo.stride(2),
        ko.stride(0),
        ko.stride(1),
        ko.stride(2),
        cb,
        cos.stride(1),
        sign,
        HQ_PAD=triton.next_power_of_2(hq),
        HK_PAD=triton.next_power_of_2(hk),
        HALF_PAD=triton.next_power_of_2(half),
        INTERLEAVED=layout == "interleaved",
    )
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, layout: str):
        if layout not in LAYOUTS:
            raise ValueError(f"rope layout must be one of {LAYOUTS}, got {layout!r}")
        if q.shape[-1] % 2:
            raise ValueError(f"apply_rope: head dim must be even, got {q.shape[-1]}")
        ctx.save_for_backward(cos, sin)
        ctx.layout = layout
        ctx.shapes = (q.shape, k.shape, q.dtype, k.dtype)
        return _launch_rope(q, k, cos, sin, layout, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        q_shape, k_shape, q_dtype, k_dtype = ctx.shapes
        if dq is None:
            dq = torch.zeros(q_shape, dtype=q_dtype, device=cos.device)
        if dk is None:
            dk = torch.zeros(k_shape, dtype=k_dtype, device=cos.device)
        dq_in, dk_in = _launch_rope(dq, dk, cos, sin, ctx.layout, -1.0)
        return dq_in, dk_in, None, None, None


def apply_rope_triton(q, k, cos, sin, layout: str = "half"):
    return RoPEFunction.apply(q, k, cos, sin, layout)
