"""Triton MLA attention (shapes and references in kernels/mla_attention.py).

Training (`mla_attention_triton`): flash attention with an online softmax; each score is
q_nope . k_nope + q_rope . k_rope, the rope key being one head shared by all query heads, and the value
head dim is its own. The forward saves the log-sum-exp per query. Which keys a query sees:
- no mask: causal, the queries being the last T of S positions;
- `seq_start` [B, T] (packed variable-length sequences, from cumulative sequence lengths): causal within
  the query's own sequence, keys seq_start[q] .. q; a query block skips every key block before its
  sequence starts;
- a boolean `mask` broadcastable to [B, H, T, S] (padding, anything else): tiles of it are loaded.
Backward, the FlashAttention-2 way without atomics: `_bwd_dkdv` owns a key block and walks the query
blocks (dk_nope, dv, and this head's share of dk_rope), `_bwd_dq` owns a query block and walks the key
blocks; the rope key's gradient is the per-head shares summed over heads in a fixed order.

Decoding (`mla_decode_triton`): absorbed queries [B, H, T, R] (+ rope) against the latent cache
[B, S, R] (+ rope keys): one KV head for all H*T query rows, so a program takes BLOCK_M of those rows
and one split of the cache; the splits' partial outputs are merged with their log-sum-exps, so one
token still spreads over many programs.

Under the interpreter `tl.dot` operands are cast to fp32 (FP32_DOT); on a GPU they stay bf16/fp16.
"""

from __future__ import annotations

import torch

from ._triton import interpreting, tl, triton


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _blocks() -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the training kernels: small under the interpreter, FA2-like on a GPU."""
    if interpreting():
        return 16, 16
    return 64, 64


BWD_WARPS = 8  # the backward holds three key-side accumulators (dk_nope, dk_rope, dv) per program


@triton.jit
def _rows(ptr, pos, ok, stride, n, BLOCK_D: tl.constexpr):
    """[len(pos), BLOCK_D] tile of rows `pos` (row stride `stride`, n valid columns); zeros elsewhere."""
    d = tl.arange(0, BLOCK_D)
    return tl.load(ptr + pos[:, None] * stride + d[None, :], mask=ok[:, None] & (d[None, :] < n), other=0.0)


@triton.jit
def _visible(
    q_pos,
    k_pos,
    q_ok,
    k_ok,
    b,
    h,
    SEQ_START,
    MASK,
    stride_sb,
    stride_mb,
    stride_mh,
    stride_mt,
    stride_ms,
    OFFSET,
    MODE: tl.constexpr,
):
    """[BM, BN] boolean: may query q_pos see key k_pos. MODE 0 causal, 1 sequence starts, 2 mask tensor."""
    ok = q_ok[:, None] & k_ok[None, :]
    if MODE == 0:
        ok = ok & (k_pos[None, :] <= q_pos[:, None] + OFFSET)
    elif MODE == 1:
        start = tl.load(SEQ_START + b * stride_sb + q_pos, mask=q_ok, other=0)
        ok = ok & (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= start[:, None])
    else:
        m = tl.load(
            MASK + b * stride_mb + h * stride_mh + q_pos[:, None] * stride_mt + k_pos[None, :] * stride_ms,
            mask=ok,
            other=0,
        )
        ok = ok & (m != 0)
    return ok


@triton.jit
def _key_range(q0, T, S, b, SEQ_START, stride_sb, OFFSET, MODE: tl.constexpr, BLOCK_M: tl.constexpr):
    """[lo, hi) of key positions a query block [q0, q0 + BLOCK_M) may need."""
    last_q = tl.minimum(q0 + BLOCK_M, T) - 1
    if MODE == 0:
        lo = 0
        hi = tl.minimum(last_q + OFFSET + 1, S)
    elif MODE == 1:
        lo = tl.load(SEQ_START + b * stride_sb + q0)  # sequences are contiguous: the first query starts earliest
        hi = last_q + 1
    else:
        lo = 0
        hi = S
    return lo, hi


@triton.jit
def _scores(
    QN,
    QR,
    kn_ptr,
    kr_ptr,
    k_pos,
    k_ok,
    stride_kn_s,
    stride_kr_s,
    DN,
    DR,
    BLOCK_DN: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    kn = _rows(kn_ptr, k_pos, k_ok, stride_kn_s, DN, BLOCK_DN)
    kr = _rows(kr_ptr, k_pos, k_ok, stride_kr_s, DR, BLOCK_DR)
    if FP32_DOT:
        kn, kr = kn.to(tl.float32), kr.to(tl.float32)
    return tl.dot(QN, tl.trans(kn)) + tl.dot(QR, tl.trans(kr))


@triton.jit
def _mla_fwd(
    QN,
    QR,
    KN,
    KR,
    V,
    OUT,
    LSE,
    SEQ_START,
    MASK,
    sqn_b,
    sqn_h,
    sqn_t,
    sqr_b,
    sqr_h,
    sqr_t,
    skn_b,
    skn_h,
    skn_s,
    skr_b,
    skr_s,
    sv_b,
    sv_h,
    sv_s,
    so_b,
    so_h,
    so_t,
    stride_sb,
    smb,
    smh,
    smt,
    sms,
    H,
    T,
    S,
    DN,
    DR,
    DV,
    OFFSET,
    scale,
    MODE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DN: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q0 = pid_m * BLOCK_M
    q_pos = q0 + tl.arange(0, BLOCK_M)
    q_ok = q_pos < T
    dv = tl.arange(0, BLOCK_DV)
    qn = _rows(QN + b * sqn_b + h * sqn_h, q_pos, q_ok, sqn_t, DN, BLOCK_DN)
    qr = _rows(QR + b * sqr_b + h * sqr_h, q_pos, q_ok, sqr_t, DR, BLOCK_DR)
    if FP32_DOT:
        qn, qr = qn.to(tl.float32), qr.to(tl.float32)
    kn_ptr = KN + b * skn_b + h * skn_h
    kr_ptr = KR + b * skr_b
    v_ptr = V + b * sv_b + h * sv_h
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    qk_scale = scale * 1.4426950408889634
    lo, hi = _key_range(q0, T, S, b, SEQ_START, stride_sb, OFFSET, MODE, BLOCK_M)
    lo = (lo // BLOCK_N) * BLOCK_N
    for k0 in range(lo, hi, BLOCK_N):
        k_pos = k0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < S
        s = _scores(qn, qr, kn_ptr, kr_ptr, k_pos, k_ok, skn_s, skr_s, DN, DR, BLOCK_DN, BLOCK_DR, FP32_DOT)
        vis = _visible(q_pos, k_pos, q_ok, k_ok, b, h, SEQ_START, MASK, stride_sb, smb, smh, smt, sms, OFFSET, MODE)
        s = tl.where(vis, s * qk_scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _rows(v_ptr, k_pos, k_ok, sv_s, DV, BLOCK_DV)
        if FP32_DOT:
            v = v.to(tl.float32)
        else:
            p = p.to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        OUT + b * so_b + h * so_h + q_pos[:, None] * so_t + dv[None, :],
        out.to(OUT.dtype.element_ty),
        mask=q_ok[:, None] & (dv[None, :] < DV),
    )
    lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_safe))  # base 2; +inf: a query that sees nothing
    tl.store(LSE + bh.to(tl.int64) * T + q_pos, lse, mask=q_ok)


@triton.jit
def _bwd_delta(
    OUT, DO, DELTA, so_b, so_h, so_t, sdo_b, sdo_h, sdo_t, H, T, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr
):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    q_pos = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    o = _rows(OUT + b * so_b + h * so_h, q_pos, q_pos < T, so_t, DV, BLOCK_DV).to(tl.float32)
    do = _rows(DO + b * sdo_b + h * sdo_h, q_pos, q_pos < T, sdo_t, DV, BLOCK_DV).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * T + q_pos, tl.sum(o * do, axis=1), mask=q_pos < T)


@triton.jit
def _query_side(
    qn_ptr,
    qr_ptr,
    do_ptr,
    LSE,
    DELTA,
    bh,
    q_pos,
    q_ok,
    sqn_t,
    sqr_t,
    sdo_t,
    T,
    DN,
    DR,
    DV,
    FP32_DOT: tl.constexpr,
    BLOCK_DN: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """What the backward needs of a query block: q_nope, q_rope, dO tiles, log-sum-exp and delta."""
    qn = _rows(qn_ptr, q_pos, q_ok, sqn_t, DN, BLOCK_DN)
    qr = _rows(qr_ptr, q_pos, q_ok, sqr_t, DR, BLOCK_DR)
    do = _rows(do_ptr, q_pos, q_ok, sdo_t, DV, BLOCK_DV)
    if FP32_DOT:
        qn, qr, do = qn.to(tl.float32), qr.to(tl.float32), do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * T + q_pos, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * T + q_pos, mask=q_ok, other=0.0)
    return qn, qr, do, lse, delta


@triton.jit
def _key_side(
    kn_ptr,
    kr_ptr,
    v_ptr,
    k_pos,
    k_ok,
    skn_s,
    skr_s,
    sv_s,
    DN,
    DR,
    DV,
    FP32_DOT: tl.constexpr,
    BLOCK_DN: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """k_nope, the shared k_rope and v tiles of a key block."""
    kn = _rows(kn_ptr, k_pos, k_ok, skn_s, DN, BLOCK_DN)
    kr = _rows(kr_ptr, k_pos, k_ok, skr_s, DR, BLOCK_DR)
    v = _rows(v_ptr, k_pos, k_ok, sv_s, DV, BLOCK_DV)
    if FP32_DOT:
        kn, kr, v = kn.to(tl.float32), kr.to(tl.float32), v.to(tl.float32)
    return kn, kr, v


@triton.jit
def _bwd_dkdv(
    QN,
    QR,
    KN,
    KR,
    V,
    DO,
    LSE,
    DELTA,
    DKN,
    DKR,
    DV_,
    SEQ_START,
    MASK,
    sqn_b,
    sqn_h,
    sqn_t,
    sqr_b,
    sqr_h,
    sqr_t,
    skn_b,
    skn_h,
    skn_s,
    skr_b,
    skr_s,
    sv_b,
    sv_h,
    sv_s,
    sdo_b,
    sdo_h,
    sdo_t,
    sdkn_b,
    sdkn_h,
    sdkn_s,
    sdkr_b,
    sdkr_h,
    sdkr_s,
    sdv_b,
    sdv_h,
    sdv_s,
    stride_sb,
    smb,
    smh,
    smt,
    sms,
    H,
    T,
    S,
    DN,
    DR,
    DV,
    OFFSET,
    scale,
    MODE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DN: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    k_pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k_pos < S
    dn, dr, dv = tl.arange(0, BLOCK_DN), tl.arange(0, BLOCK_DR), tl.arange(0, BLOCK_DV)
    kn, kr, v = _key_side(
        KN + b * skn_b + h * skn_h,
        KR + b * skr_b,
        V + b * sv_b + h * sv_h,
        k_pos,
        k_ok,
        skn_s,
        skr_s,
        sv_s,
        DN,
        DR,
        DV,
        FP32_DOT,
        BLOCK_DN,
        BLOCK_DR,
        BLOCK_DV,
    )
    dkn = tl.zeros((BLOCK_N, BLOCK_DN), tl.float32)
    dkr = tl.zeros((BLOCK_N, BLOCK_DR), tl.float32)
    dvv = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    qk_scale = scale * 1.4426950408889634
    # the first query that may see this key block (causal: none before it, shifted by the cache offset)
    q_lo = 0
    if MODE == 0:
        q_lo = tl.maximum(pid_n * BLOCK_N - OFFSET, 0)
    elif MODE == 1:
        q_lo = pid_n * BLOCK_N
    q_lo = (q_lo // BLOCK_M) * BLOCK_M
    for q0 in range(q_lo, T, BLOCK_M):
        q_pos = q0 + tl.arange(0, BLOCK_M)
        q_ok = q_pos < T
        qn, qr, do, lse, delta = _query_side(
            QN + b * sqn_b + h * sqn_h,
            QR + b * sqr_b + h * sqr_h,
            DO + b * sdo_b + h * sdo_h,
            LSE,
            DELTA,
            bh,
            q_pos,
            q_ok,
            sqn_t,
            sqr_t,
            sdo_t,
            T,
            DN,
            DR,
            DV,
            FP32_DOT,
            BLOCK_DN,
            BLOCK_DR,
            BLOCK_DV,
        )
        s = tl.dot(qn, tl.trans(kn)) + tl.dot(qr, tl.trans(kr))  # [BM, BN]
        vis = _visible(q_pos, k_pos, q_ok, k_ok, b, h, SEQ_START, MASK, stride_sb, smb, smh, smt, sms, OFFSET, MODE)
        p = tl.where(vis, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if FP32_DOT:
            dvv += tl.dot(tl.trans(p), do)
            dkn += tl.dot(tl.trans(ds), qn)
            dkr += tl.dot(tl.trans(ds), qr)
        else:
            dvv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dkn += tl.dot(tl.trans(ds.to(qn.dtype)), qn)
            dkr += tl.dot(tl.trans(ds.to(qr.dtype)), qr)
    tl.store(
        DKN + b * sdkn_b + h * sdkn_h + k_pos[:, None] * sdkn_s + dn[None, :],
        (dkn * scale).to(DKN.dtype.element_ty),
        mask=k_ok[:, None] & (dn[None, :] < DN),
    )
    tl.store(
        DKR + b * sdkr_b + h * sdkr_h + k_pos[:, None] * sdkr_s + dr[None, :],
        dkr * scale,
        mask=k_ok[:, None] & (dr[None, :] < DR),
    )
    tl.store(
        DV_ + b * sdv_b + h * sdv_h + k_pos[:, None] * sdv_s + dv[None, :],
        dvv.to(DV_.dtype.element_ty),
        mask=k_ok[:, None] & (dv[None, :] < DV),
    )


@triton.jit
def _bwd_dq(
    QN,
    QR,
    KN,
    KR,
    V,
    DO,
    LSE,
    DELTA,
    DQN,
    DQR,
    SEQ_START,
    MASK,
    sqn_b,
    sqn_h,
    sqn_t,
    sqr_b,
    sqr_h,
    sqr_t,
    skn_b,
    skn_h,
    skn_s,
    skr_b,
    skr_s,
    sv_b,
    sv_h,
    sv_s,
    sdo_b,
    sdo_h,
    sdo_t,
    sdqn_b,
    sdqn_h,
    sdqn_t,
    sdqr_b,
    sdqr_h,
    sdqr_t,
    stride_sb,
    smb,
    smh,
    smt,
    sms,
    H,
    T,
    S,
    DN,
    DR,
    DV,
    OFFSET,
    scale,
    MODE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DN: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    q0 = pid_m * BLOCK_M
    q_pos = q0 + tl.arange(0, BLOCK_M)
    q_ok = q_pos < T
    dn, dr = tl.arange(0, BLOCK_DN), tl.arange(0, BLOCK_DR)
    qn, qr, do, lse, delta = _query_side(
        QN + b * sqn_b + h * sqn_h,
        QR + b * sqr_b + h * sqr_h,
        DO + b * sdo_b + h * sdo_h,
        LSE,
        DELTA,
        bh,
        q_pos,
        q_ok,
        sqn_t,
        sqr_t,
        sdo_t,
        T,
        DN,
        DR,
        DV,
        FP32_DOT,
        BLOCK_DN,
        BLOCK_DR,
        BLOCK_DV,
    )
    dqn = tl.zeros((BLOCK_M, BLOCK_DN), tl.float32)
    dqr = tl.zeros((BLOCK_M, BLOCK_DR), tl.float32)
    qk_scale = scale * 1.4426950408889634
    kn_ptr = KN + b * skn_b + h * skn_h
    kr_ptr = KR + b * skr_b
    lo, hi = _key_range(q0, T, S, b, SEQ_START, stride_sb, OFFSET, MODE, BLOCK_M)
    lo = (lo // BLOCK_N) * BLOCK_N
    for k0 in range(lo, hi, BLOCK_N):
        k_pos = k0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < S
        kn, kr, v = _key_side(
            kn_ptr,
            kr_ptr,
            V + b * sv_b + h * sv_h,
            k_pos,
            k_ok,
            skn_s,
            skr_s,
            sv_s,
            DN,
            DR,
            DV,
            FP32_DOT,
            BLOCK_DN,
            BLOCK_DR,
            BLOCK_DV,
        )
        s = tl.dot(qn, tl.trans(kn)) + tl.dot(qr, tl.trans(kr))
        vis = _visible(q_pos, k_pos, q_ok, k_ok, b, h, SEQ_START, MASK, stride_sb, smb, smh, smt, sms, OFFSET, MODE)
        p = tl.where(vis, tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        if not FP32_DOT:
            ds = ds.to(kn.dtype)
        dqn += tl.dot(ds, kn)
        dqr += tl.dot(ds, kr)
    tl.store(
        DQN + b * sdqn_b + h * sdqn_h + q_pos[:, None] * sdqn_t + dn[None, :],
        (dqn * scale).to(DQN.dtype.element_ty),
        mask=q_ok[:, None] & (dn[None, :] < DN),
    )
    tl.store(
        DQR + b * sdqr_b + h * sdqr_h + q_pos[:, None] * sdqr_t + dr[None, :],
        (dqr * scale).to(DQR.dtype.element_ty),
        mask=q_ok[:, None] & (dr[None, :] < DR),
    )


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _mode_args(mask, seq_start, b: int, h: int, t: int, s: int, device):
    """(MODE, seq_start tensor, its batch stride, mask tensor, its 4 strides) for the kernels."""
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    if seq_start is not None:
        ss = seq_start.to(torch.int32).expand(b, t).contiguous()
        return 1, ss, ss.stride(0), dummy, (0, 0, 0, 0)
    if mask is None:
        if t != s and t != 1:
            raise ValueError("mla_attention: pass a mask when queries are not the whole key range or one token")
        return 0, dummy, 0, dummy, (0, 0, 0, 0)
    # bool and int8 are both one byte: read the mask in place (every layer gets the same one) rather than copy it
    m = mask.view(torch.int8) if mask.dtype == torch.bool else (mask != 0).to(torch.int8)
    m = m.expand(b, h, t, s)  # broadcast dims get stride 0, nothing is copied
    return 2, dummy, 0, m, tuple(m.stride())


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


class MLAAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_nope, q_rope, k_nope, k_rope, v, scale, mask, seq_start):
        q_nope, q_rope, k_nope, k_rope, v = (_last_contiguous(x) for x in (q_nope, q_rope, k_nope, k_rope, v))
        b, h, t, dn = q_nope.shape
        s, dr, dv = k_nope.shape[2], q_rope.shape[-1], v.shape[-1]
        mode, ss, ss_b, m, m_str = _mode_args(mask, seq_start, b, h, t, s, q_nope.device)
        bm, bn = _blocks()
        out = torch.empty(b, h, t, dv, dtype=q_nope.dtype, device=q_nope.device)
        lse = torch.empty(b * h, t, dtype=torch.float32, device=q_nope.device)
        consts = dict(
            MODE=mode,
            FP32_DOT=interpreting(),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_DN=_pow2(dn),
            BLOCK_DR=_pow2(dr),
            BLOCK_DV=_pow2(dv),
        )
        if b * h * t:
            _mla_fwd[(triton.cdiv(t, bm), b * h)](
                q_nope,
                q_rope,
                k_nope,
                k_rope,
                v,
                out,
                lse,
                ss,
                m,
                *_strides3(q_nope),
                *_strides3(q_rope),
                *_strides3(k_nope),
                k_rope.stride(0),
                k_rope.stride(2),
                *_strides3(v),
                *_strides3(out),
                ss_b,
                *m_str,
                h,
                t,
                s,
                dn,
                dr,
                dv,
                s - t,
                scale,
                **consts,
            )
        ctx.save_for_backward(q_nope, q_rope, k_nope, k_rope, v, out, lse, ss, m)
        ctx.scale, ctx.m_str, ctx.ss_b, ctx.consts = scale, m_str, ss_b, consts
        return out

    @staticmethod
    def backward(ctx, dout):
        q_nope, q_rope, k_nope, k_rope, v, out, lse, ss, m = ctx.saved_tensors
        consts = ctx.consts
        dout = _last_contiguous(dout)
        b, h, t, dn = q_nope.shape
        s, dr, dv = k_nope.shape[2], q_rope.shape[-1], v.shape[-1]
        bm, bn = consts["BLOCK_M"], consts["BLOCK_N"]
        delta = torch.empty_like(lse)
        dq_nope, dq_rope = torch.empty_like(q_nope), torch.empty_like(q_rope)
        dk_nope, dv_ = torch.empty_like(k_nope), torch.empty_like(v)
        dk_rope_heads = torch.empty(b, h, s, dr, dtype=torch.float32, device=q_nope.device)
        if b * h * t:
            _bwd_delta[(triton.cdiv(t, bm), b * h)](
                out, dout, delta, *_strides3(out), *_strides3(dout), h, t, dv, BLOCK_M=bm, BLOCK_DV=consts["BLOCK_DV"]
            )
            common = (
                *_strides3(q_nope),
                *_strides3(q_rope),
                *_strides3(k_nope),
                k_rope.stride(0),
                k_rope.stride(2),
                *_strides3(v),
                *_strides3(dout),
            )
            tail = (ctx.ss_b, *ctx.m_str, h, t, s, dn, dr, dv, s - t, ctx.scale)
            _bwd_dkdv[(triton.cdiv(s, bn), b * h)](
                q_nope,
                q_rope,
                k_nope,
                k_rope,
                v,
                dout,
                lse,
                delta,
                dk_nope,
                dk_rope_heads,
                dv_,
                ss,
                m,
                *common,
                *_strides3(dk_nope),
                *_strides3(dk_rope_heads),
                *_strides3(dv_),
                *tail,
                num_warps=BWD_WARPS,
                **consts,
            )
            _bwd_dq[(triton.cdiv(t, bm), b * h)](
                q_nope,
                q_rope,
                k_nope,
                k_rope,
                v,
                dout,
                lse,
                delta,
                dq_nope,
                dq_rope,
                ss,
                m,
                *common,
                *_strides3(dq_nope),
                *_strides3(dq_rope),
                *tail,
                num_warps=BWD_WARPS,
                **consts,
            )
        else:
            dk_nope.zero_(), dv_.zero_(), dk_rope_heads.zero_()
        dk_rope = dk_rope_heads.sum(1, keepdim=True).to(k_rope.dtype)  # the shared rope key: sum over heads
        return dq_nope, dq_rope, dk_nope, dk_rope, dv_, None, None, None


def mla_attention_triton(q_nope, q_rope, k_nope, k_rope, v, scale: float, mask=None, seq_start=None):
    return MLAAttentionFunction.apply(q_nope, q_rope, k_nope, k_rope, v, scale, mask, seq_start)


# ---------------------------------------------------------------- decoding over the latent cache


@triton.jit
def _mla_decode_split(
    QL,
    QR,
    CKV,
    KR,
    PO,
    PLSE,
    MASK,
    sql_b,
    sql_h,
    sql_t,
    sqr_b,
    sqr_h,
    sqr_t,
    sc_b,
    sc_s,
    skr_b,
    skr_s,
    spo_b,
    spo_r,
    spo_sp,
    smb,
    smh,
    smt,
    sms,
    H,
    T,
    S,
    R,
    DR,
    OFFSET,
    scale,
    SPLIT_LEN,
    MODE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DR: tl.constexpr,
):
    """Rows are (head, query) pairs of one batch element: row = h * T + t. One split of the cache."""
    pid_m, b, sp = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < H * T
    hh = (rows // T).to(tl.int64)
    tt = (rows % T).to(tl.int64)
    rr, dr = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_DR)
    ql = tl.load(
        QL + b * sql_b + hh[:, None] * sql_h + tt[:, None] * sql_t + rr[None, :],
        mask=row_ok[:, None] & (rr[None, :] < R),
        other=0.0,
    )
    qr = tl.load(
        QR + b * sqr_b + hh[:, None] * sqr_h + tt[:, None] * sqr_t + dr[None, :],
        mask=row_ok[:, None] & (dr[None, :] < DR),
        other=0.0,
    )
    if FP32_DOT:
        ql, qr = ql.to(tl.float32), qr.to(tl.float32)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    qk_scale = scale * 1.4426950408889634
    k_start = sp * SPLIT_LEN
    k_end = tl.minimum(k_start + SPLIT_LEN, S)
    for k0 in range(k_start, k_end, BLOCK_N):
        k_pos = k0 + tl.arange(0, BLOCK_N)
        k_ok = k_pos < k_end
        c = _rows(CKV + b * sc_b, k_pos, k_ok, sc_s, R, BLOCK_R)
        kr = _rows(KR + b * skr_b, k_pos, k_ok, skr_s, DR, BLOCK_DR)
        if FP32_DOT:
            c, kr = c.to(tl.float32), kr.to(tl.float32)
        s = tl.dot(ql, tl.trans(c)) + tl.dot(qr, tl.trans(kr))
        ok = row_ok[:, None] & k_ok[None, :]
        if MODE == 0:
            ok = ok & (k_pos[None, :] <= tt[:, None] + OFFSET)
        elif MODE == 2:
            mv = tl.load(
                MASK + b * smb + hh[:, None] * smh + tt[:, None] * smt + k_pos[None, :] * sms, mask=ok, other=0
            )
            ok = ok & (mv != 0)
        s = tl.where(ok, s * qk_scale, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if not FP32_DOT:
            p = p.to(c.dtype)
        acc = acc * alpha[:, None] + tl.dot(p, c)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(l_i == 0.0, -float("inf"), m_i + tl.log2(l_safe))  # -inf: this split saw nothing
    tl.store(
        PO + b * spo_b + rows[:, None].to(tl.int64) * spo_r + sp * spo_sp + rr[None, :],
        acc / l_safe[:, None],
        mask=row_ok[:, None] & (rr[None, :] < R),
    )
    tl.store(PLSE + (b * H * T + rows) * tl.num_programs(2) + sp, lse, mask=row_ok)


@triton.jit
def _mla_decode_merge(
    PO,
    PLSE,
    OUT,
    spo_b,
    spo_r,
    spo_sp,
    so_b,
    so_h,
    so_t,
    H,
    T,
    R,
    NSPLIT,
    BLOCK_SPLIT: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    row, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    hh, tt = row // T, row % T
    sp = tl.arange(0, BLOCK_SPLIT)
    sp_ok = sp < NSPLIT
    lse = tl.load(PLSE + (b * H * T + row) * NSPLIT + sp, mask=sp_ok, other=-float("inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == -float("inf"), 0.0, top)
    w = tl.exp2(lse - top)
    w = w / tl.maximum(tl.sum(w, axis=0), 1e-30)
    rr = tl.arange(0, BLOCK_R)
    po = tl.load(
        PO + b * spo_b + row.to(tl.int64) * spo_r + sp[:, None] * spo_sp + rr[None, :],
        mask=sp_ok[:, None] & (rr[None, :] < R),
        other=0.0,
    )
    out = tl.sum(po * w[:, None], axis=0)
    tl.store(
        OUT + b * so_b + hh.to(tl.int64) * so_h + tt.to(tl.int64) * so_t + rr, out.to(OUT.dtype.element_ty), mask=rr < R
    )


def mla_decode_triton(q_latent, q_rope, c_kv, k_rope, scale: float, mask=None, num_splits: int | None = None):
    q_latent, q_rope, c_kv, k_rope = (_last_contiguous(x) for x in (q_latent, q_rope, c_kv, k_rope))
    b, h, t, r = q_latent.shape
    s, dr = c_kv.shape[1], q_rope.shape[-1]
    mode, _, _, m, m_str = _mode_args(mask, None, b, h, t, s, q_latent.device)
    bm, bn = 16, 32  # a few (head, query) rows per program; the latent row (512 wide) is the large operand
    if num_splits is None:  # enough programs to fill the device; a split of at least a few key blocks
        rows_blocks = triton.cdiv(h * t, bm)
        sms = torch.cuda.get_device_properties(q_latent.device).multi_processor_count if q_latent.is_cuda else 4
        num_splits = max(1, min(triton.cdiv(s, 4 * bn), triton.cdiv(2 * sms, max(1, b * rows_blocks))))
    split_len = triton.cdiv(triton.cdiv(max(s, 1), num_splits), bn) * bn
    num_splits = max(1, triton.cdiv(s, split_len))
    partial = torch.empty(b, h * t, num_splits, r, dtype=torch.float32, device=q_latent.device)
    plse = torch.empty(b, h * t, num_splits, dtype=torch.float32, device=q_latent.device)
    out = torch.empty(b, h, t, r, dtype=q_latent.dtype, device=q_latent.device)
    if b * h * t == 0:
        return out
    _mla_decode_split[(triton.cdiv(h * t, bm), b, num_splits)](
        q_latent,
        q_rope,
        c_kv,
        k_rope,
        partial,
        plse,
        m,
        *_strides3(q_latent),
        *_strides3(q_rope),
        c_kv.stride(0),
        c_kv.stride(1),
        k_rope.stride(0),
        k_rope.stride(1),
        *_strides3(partial),
        *m_str,
        h,
        t,
        s,
        r,
        dr,
        s - t,
        scale,
        split_len,
        MODE=mode,
        FP32_DOT=interpreting(),
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_R=_pow2(r),
        BLOCK_DR=_pow2(dr),
    )
    _mla_decode_merge[(h * t, b)](
        partial,
        plse,
        out,
        *_strides3(partial),
        *_strides3(out),
        h,
        t,
        r,
        num_splits,
        BLOCK_SPLIT=max(2, triton.next_power_of_2(num_splits)),
        BLOCK_R=_pow2(r),
    )
    return out
