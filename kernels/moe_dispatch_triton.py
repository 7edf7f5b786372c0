"""Triton MoE token dispatch: the kernels behind `moe_experts` and `grouped_mlp` (references and the
shapes in kernels/moe_dispatch.py).

Forward, for x [N, H], top-k ids and weights [N, K], w_gate_up [E, 2I, H], w_down [E, H, I]:
1. Dispatch (`dispatch`): the N*K (token, slot) assignments are counted per expert per block of
   assignments (a one-hot sum), one program turns the block counts into each block's starting place
   inside each expert's segment and the segments' starts (prefix sums), and a scatter writes every
   assignment's place: `order[place] = assignment`, `place_of[assignment] = place`. Ranks inside a
   block come from a cumulative sum, so the order is stable (ties keep token order) and the same on
   every run. The same program also numbers the row tiles of every expert (`tile_start`), so the
   GEMMs below find their expert without a host sync.
2. Gate/up grouped GEMM (`_gate_up_swiglu`): a program owns BLOCK_M rows of one expert and BLOCK_N
   columns of the gate and of the up projection; it gathers its rows of x by token (no x_sorted copy),
   and its epilogue applies SwiGLU (rounded like eager PyTorch) and writes h [N*K, I] (and the
   pre-activations when training needs them for the backward).
3. Down grouped GEMM (`_grouped_mm`): y [N*K, H] = h @ w_down[e]^T per segment.
4. Combine (`_combine`): out[n] = sum_k w[n, k] * y[place_of[n, k]], summed in a fixed order in fp32
   (no atomics: deterministic).

Backward: the combine's gradient (`_combine_bwd`, dy and the routing weights' gradient), dh = dy @ w_down[e]
(`_grouped_mm`), SwiGLU's backward (the kernel of kernels/swiglu.py on the two halves), dx per assignment
= d_gate_up @ w_gate_up[e] (`_grouped_mm`) summed per token by `_combine` without weights, and the weight
gradients per expert (`_grouped_wgrad`: each program reduces one [BLOCK_N, BLOCK_K] tile of one expert
over that expert's rows, in order; an expert with no tokens gets zeros).

Under the interpreter `tl.dot` operands are cast to fp32 (FP32_DOT): its bf16/fp16 dots are wrong there.
"""

from __future__ import annotations

import torch

from ._triton import interpreting, tl, triton
from .swiglu import _swiglu_bwd

DISPATCH_BLOCK = 256  # assignments per program in the count and scatter kernels


def _gemm_blocks() -> dict:
    """Tile sizes: small under the interpreter (each program costs milliseconds), tensor-core sized on a GPU."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)


# ---------------------------------------------------------------- dispatch


@triton.jit
def _block_counts(IDX, COUNTS, NA, BLOCK: tl.constexpr, E_P: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    idx = tl.load(IDX + offs, mask=offs < NA, other=-1)
    experts = tl.arange(0, E_P)
    hit = (idx[:, None] == experts[None, :]).to(tl.int32)
    tl.store(COUNTS + b * E_P + experts, tl.sum(hit, axis=0))


@triton.jit
def _expert_offsets(COUNTS, BLOCK_OFF, TOTAL, START, TILE_START, NB, BLOCK_M: tl.constexpr, E_P: tl.constexpr):
    experts = tl.arange(0, E_P)
    run = tl.zeros((E_P,), dtype=tl.int32)
    for b in range(0, NB):
        c = tl.load(COUNTS + b * E_P + experts)
        tl.store(BLOCK_OFF + b * E_P + experts, run)
        run += c
    tl.store(TOTAL + experts, run)
    tl.store(START + experts, tl.cumsum(run, axis=0) - run)
    tiles = (run + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, axis=0)
    tl.store(TILE_START + experts, tile_end - tiles)
    tl.store(TILE_START + E_P, tl.sum(tiles, axis=0))  # the number of tiles, at index E_P


@triton.jit
def _scatter_places(IDX, BLOCK_OFF, START, ORDER, PLACE_OF, NA, BLOCK: tl.constexpr, E_P: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    m = offs < NA
    idx = tl.load(IDX + offs, mask=m, other=-1)
    experts = tl.arange(0, E_P)
    hit = (idx[:, None] == experts[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(hit, axis=0) * hit, axis=1) - 1  # earlier assignments of the same expert
    base = tl.load(BLOCK_OFF + b * E_P + experts) + tl.load(START + experts)
    place = tl.sum(hit * base[None, :], axis=1) + rank
    tl.store(ORDER + place, offs, mask=m)
    tl.store(PLACE_OF + offs, place, mask=m)


class Dispatch:
    """Where every (token, slot) assignment goes: order [N*K] (assignments sorted by expert), place_of
    [N*K] (its inverse), counts/start [E] (each expert's segment), tile_start [E_P + 1] (first row tile
    of each expert; the last entry is the number of tiles) for row tiles of `block_m`."""

    def __init__(self, order, place_of, counts, start, tile_start, e_pad: int, block_m: int, num_assignments: int):
        self.order, self.place_of, self.counts, self.start, self.tile_start = order, place_of, counts, start, tile_start
        self.e_pad, self.block_m = e_pad, block_m
        # an upper bound on the tiles (no host sync): programs past the real count do nothing
        self.max_tiles = triton.cdiv(num_assignments, block_m) + counts.shape[0]


def _segments(block_counts: torch.Tensor, block_m: int):
    """(each block's place in each expert's segment, per-expert counts, segment starts, tile table) from
    per-block expert counts [blocks, E_P]: one program walks the blocks."""
    nb, e_pad = block_counts.shape
    block_off = torch.empty_like(block_counts)
    total = torch.empty(e_pad, dtype=torch.int32, device=block_counts.device)
    start = torch.empty_like(total)
    tile_start = torch.empty(e_pad + 1, dtype=torch.int32, device=block_counts.device)
    _expert_offsets[(1,)](block_counts, block_off, total, start, tile_start, nb, BLOCK_M=block_m, E_P=e_pad)
    return block_off, total, start, tile_start


def dispatch(topk_idx: torch.Tensor, num_experts: int, block_m: int) -> Dispatch:
    flat = topk_idx.reshape(-1).to(torch.int32).contiguous()
    na = flat.numel()
    e_pad = max(2, triton.next_power_of_2(num_experts))
    nb = max(1, triton.cdiv(na, DISPATCH_BLOCK))
    block_counts = torch.empty(nb, e_pad, dtype=torch.int32, device=flat.device)
    _block_counts[(nb,)](flat, block_counts, na, BLOCK=DISPATCH_BLOCK, E_P=e_pad)
    block_off, total, start, tile_start = _segments(block_counts, block_m)
    order = torch.empty(na, dtype=torch.int32, device=flat.device)
    place_of = torch.empty_like(order)
    if na:
        _scatter_places[(nb,)](flat, block_off, start, order, place_of, na, BLOCK=DISPATCH_BLOCK, E_P=e_pad)
    return Dispatch(order, place_of, total[:num_experts], start[:num_experts], tile_start, e_pad, block_m, na)


def dispatch_from_counts(counts: torch.Tensor, block_m: int) -> Dispatch:
    """Segments given by per-expert row counts of rows already grouped by expert (expert parallelism)."""
    e = counts.shape[0]
    e_pad = max(2, triton.next_power_of_2(e))
    padded = torch.zeros(1, e_pad, dtype=torch.int32, device=counts.device)
    padded[0, :e] = counts.to(torch.int32)
    _, total, start, tile_start = _segments(padded, block_m)
    return Dispatch(None, None, total[:e], start[:e], tile_start, e_pad, block_m, int(counts.sum()))


# ---------------------------------------------------------------- grouped GEMMs


@triton.jit
def _tile_of(TILE_START, START, COUNTS, t, BLOCK_M: tl.constexpr, E_P: tl.constexpr):
    """(expert, first row, end row) of row tile t; expert -1 past the last tile."""
    starts = tl.load(TILE_START + tl.arange(0, E_P))
    n_tiles = tl.load(TILE_START + E_P)
    e = tl.sum((starts <= t).to(tl.int32), axis=0) - 1
    e = tl.where(t < n_tiles, e, -1)
    e_safe = tl.maximum(e, 0)
    seg = tl.load(START + e_safe)
    row0 = seg + (t - tl.load(TILE_START + e_safe)) * BLOCK_M
    return e, row0, seg + tl.load(COUNTS + e_safe)


@triton.jit
def _gate_up_swiglu(
    X,
    ORDER,
    W,
    GU,
    Hout,
    START,
    COUNTS,
    TILE_START,
    INTER,
    K_DIM,
    TOPK,
    stride_xm,
    stride_we,
    stride_wn,
    stride_wk,
    stride_gu,
    stride_h,
    GATHER: tl.constexpr,
    SAVE_GU: tl.constexpr,
    FP32_DOT: tl.constexpr,
    E_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e, row0, row_end = _tile_of(TILE_START, START, COUNTS, tl.program_id(0), BLOCK_M, E_P)
    if e >= 0:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        if GATHER:
            src = (tl.load(ORDER + rows, mask=rmask, other=0) // TOPK).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < INTER
        w_e = W + e.to(tl.int64) * stride_we
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_DIM, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K_DIM
            a = tl.load(X + src[:, None] * stride_xm + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            wmask = kmask[:, None] & cmask[None, :]
            bg = tl.load(w_e + cols[None, :] * stride_wn + ks[:, None] * stride_wk, mask=wmask, other=0.0)
            bu = tl.load(w_e + (cols[None, :] + INTER) * stride_wn + ks[:, None] * stride_wk, mask=wmask, other=0.0)
            if FP32_DOT:
                a, bg, bu = a.to(tl.float32), bg.to(tl.float32), bu.to(tl.float32)
            acc_g += tl.dot(a, bg)
            acc_u += tl.dot(a, bu)
        out_ty = Hout.dtype.element_ty
        g = acc_g.to(out_ty).to(tl.float32)  # eager: the projection is rounded to the dtype first
        u = acc_u.to(out_ty).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(out_ty).to(tl.float32)
        omask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        tl.store(Hout + rows64[:, None] * stride_h + cols[None, :], (act * u).to(out_ty), mask=omask)
        if SAVE_GU:
            tl.store(GU + rows64[:, None] * stride_gu + cols[None, :], g.to(out_ty), mask=omask)
            tl.store(GU + rows64[:, None] * stride_gu + (cols[None, :] + INTER), u.to(out_ty), mask=omask)


@triton.jit
def _grouped_mm(
    A,
    B,
    C,
    START,
    COUNTS,
    TILE_START,
    N,
    K_DIM,
    stride_am,
    stride_be,
    stride_bk,
    stride_bn,
    stride_cm,
    FP32_DOT: tl.constexpr,
    E_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[r] = A[r] @ B[e] for the rows r of expert e; B[e] is [K_DIM, N] through its strides."""
    e, row0, row_end = _tile_of(TILE_START, START, COUNTS, tl.program_id(0), BLOCK_M, E_P)
    if e >= 0:
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        rows64 = rows.to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        b_e = B + e.to(tl.int64) * stride_be
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_DIM, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K_DIM
            a = tl.load(A + rows64[:, None] * stride_am + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(
                b_e + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                mask=kmask[:, None] & cmask[None, :],
                other=0.0,
            )
            if FP32_DOT:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b)
        tl.store(
            C + rows64[:, None] * stride_cm + cols[None, :],
            acc.to(C.dtype.element_ty),
            mask=rmask[:, None] & cmask[None, :],
        )


@triton.jit
def _grouped_wgrad(
    G,
    A,
    ORDER,
    DW,
    START,
    COUNTS,
    N,
    K_DIM,
    TOPK,
    stride_gm,
    stride_am,
    stride_we,
    stride_wn,
    stride_wk,
    GATHER: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """DW[e] = G[rows of e]^T @ A[rows of e] ([N, K_DIM]); A's rows gathered by token when GATHER."""
    e = tl.program_id(0)
    ns = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask, kmask = ns < N, ks < K_DIM
    seg = tl.load(START + e)
    cnt = tl.load(COUNTS + e)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, cnt, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        rmask = r < cnt
        rows = (seg + r).to(tl.int64)
        if GATHER:
            src = (tl.load(ORDER + rows, mask=rmask, other=0) // TOPK).to(tl.int64)
        else:
            src = rows
        g = tl.load(G + rows[:, None] * stride_gm + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        a = tl.load(A + src[:, None] * stride_am + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        if FP32_DOT:
            g, a = g.to(tl.float32), a.to(tl.float32)
        acc += tl.dot(tl.trans(g), a)
    tl.store(
        DW + e.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk,
        acc.to(DW.dtype.element_ty),
        mask=nmask[:, None] & kmask[None, :],
    )


# ---------------------------------------------------------------- combine


@triton.jit
def _combine(
    Y, PLACE_OF, W, OUT, H, stride_y, stride_o, TOPK: tl.constexpr, HAS_W: tl.constexpr, BLOCK_H: tl.constexpr
):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOPK):
        p = tl.load(PLACE_OF + n * TOPK + k).to(tl.int64)
        y = tl.load(Y + p * stride_y + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_W:
            acc += tl.load(W + n * TOPK + k).to(tl.float32) * y
        else:
            acc += y
    tl.store(OUT + n * stride_o + cols, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _combine_bwd(
    DOUT, Y, PLACE_OF, W, DY, DW, H, stride_do, stride_y, stride_dy, TOPK: tl.constexpr, BLOCK_H: tl.constexpr
):
    n = tl.program_id(0).to(tl.int64)
    for k in tl.static_range(TOPK):
        p = tl.load(PLACE_OF + n * TOPK + k).to(tl.int64)
        w = tl.load(W + n * TOPK + k).to(tl.float32)
        dot = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            m = cols < H
            d = tl.load(DOUT + n * stride_do + cols, mask=m, other=0.0).to(tl.float32)
            y = tl.load(Y + p * stride_y + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DY + p * stride_dy + cols, (w * d).to(DY.dtype.element_ty), mask=m)
            dot += d * y
        tl.store(DW + n * TOPK + k, tl.sum(dot, axis=0).to(DW.dtype.element_ty))


# ---------------------------------------------------------------- launchers


def _gate_up(x, d: Dispatch, w_gate_up, rows: int, topk: int, save: bool):
    inter = w_gate_up.shape[1] // 2
    cfg = _gemm_blocks()
    h = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    gu = torch.empty(rows, 2 * inter, dtype=x.dtype, device=x.device) if save else h
    grid = (d.max_tiles, triton.cdiv(inter, cfg["BLOCK_N"]))
    if rows:
        _gate_up_swiglu[grid](
            x,
            d.order if d.order is not None else x,
            w_gate_up,
            gu,
            h,
            d.start,
            d.counts,
            d.tile_start,
            inter,
            x.shape[1],
            topk,
            x.stride(0),
            *w_gate_up.stride(),
            gu.stride(0),
            h.stride(0),
            GATHER=d.order is not None,
            SAVE_GU=save,
            FP32_DOT=interpreting(),
            E_P=d.e_pad,
            **cfg,
        )
    return (gu if save else None), h


def _mm(a, d: Dispatch, b, n: int, stride_bk: int, stride_bn: int):
    """a [rows, K] times each expert's b[e] viewed as [K, n] through (stride_bk, stride_bn)."""
    cfg = _gemm_blocks()
    c = torch.empty(a.shape[0], n, dtype=a.dtype, device=a.device)
    if a.shape[0]:
        _grouped_mm[(d.max_tiles, triton.cdiv(n, cfg["BLOCK_N"]))](
            a,
            b,
            c,
            d.start,
            d.counts,
            d.tile_start,
            n,
            a.shape[1],
            a.stride(0),
            b.stride(0),
            stride_bk,
            stride_bn,
            c.stride(0),
            FP32_DOT=interpreting(),
            E_P=d.e_pad,
            **cfg,
        )
    return c


def _wgrad(g, a, d: Dispatch, shape, dtype, topk: int, gather: bool):
    cfg = _gemm_blocks()
    e, n, k = shape
    dw = torch.empty(shape, dtype=dtype, device=g.device)
    grid = (e, triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))
    _grouped_wgrad[grid](
        g,
        a,
        d.order if gather else g,
        dw,
        d.start,
        d.counts,
        n,
        k,
        topk,
        g.stride(0),
        a.stride(0),
        *dw.stride(),
        GATHER=gather,
        FP32_DOT=interpreting(),
        **cfg,
    )
    return dw


def _combine_rows(y, place_of, weight, n_tokens: int, topk: int, out_dtype):
    h = y.shape[1]
    out = torch.empty(n_tokens, h, dtype=out_dtype, device=y.device)
    block = min(1024, triton.next_power_of_2(max(h, 1)))
    if n_tokens:
        _combine[(n_tokens, triton.cdiv(h, block))](
            y,
            place_of,
            weight if weight is not None else y,
            out,
            h,
            y.stride(0),
            out.stride(0),
            TOPK=topk,
            HAS_W=weight is not None,
            BLOCK_H=block,
        )
    return out


def _swiglu_backward(dh, gu):
    rows, inter = dh.shape
    dgu = torch.empty_like(gu)
    block = min(1024, triton.next_power_of_2(max(inter, 1)))
    if rows:
        _swiglu_bwd[(rows, triton.cdiv(inter, block))](
            dh,
            gu,
            gu[:, inter:],
            dgu,
            dgu[:, inter:],
            dh.stride(0),
            gu.stride(0),
            gu.stride(0),
            dgu.stride(0),
            dgu.stride(0),
            inter,
            BLOCK=block,
        )
    return dgu


def _expert_grads(d: Dispatch, x, gu, h, dy, w_gate_up, w_down, topk: int, gather: bool):
    """From dy (gradient of the down projection's output, in dispatch order): dx per row, dW_gate_up, dW_down."""
    inter = w_down.shape[2]
    dh = _mm(dy, d, w_down, inter, w_down.stride(1), w_down.stride(2))
    dgu = _swiglu_backward(dh, gu)
    dx_rows = _mm(dgu, d, w_gate_up, w_gate_up.shape[2], w_gate_up.stride(1), w_gate_up.stride(2))
    dw_down = _wgrad(dy, h, d, tuple(w_down.shape), w_down.dtype, topk, gather=False)
    dw_gate_up = _wgrad(dgu, x, d, tuple(w_gate_up.shape), w_gate_up.dtype, topk, gather=gather)
    return dx_rows, dw_gate_up, dw_down


def _contiguous(*ts):
    return [t.contiguous() for t in ts]


class MoEExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weight, w_gate_up, w_down):
        x, w_gate_up, w_down = _contiguous(x, w_gate_up, w_down)
        n, topk = topk_idx.shape
        weight = topk_weight.contiguous()
        d = dispatch(topk_idx, w_gate_up.shape[0], _gemm_blocks()["BLOCK_M"])
        train = any(ctx.needs_input_grad)
        gu, h = _gate_up(x, d, w_gate_up, n * topk, topk, save=train)
        y = _mm(h, d, w_down, w_down.shape[1], w_down.stride(2), w_down.stride(1))
        out = _combine_rows(y, d.place_of, weight, n, topk, x.dtype)
        if train:
            ctx.save_for_backward(x, weight, w_gate_up, w_down, gu, h, y)
            ctx.d, ctx.topk = d, topk
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, w_gate_up, w_down, gu, h, y = ctx.saved_tensors
        d, topk = ctx.d, ctx.topk
        n = x.shape[0]
        dout = dout.contiguous()
        dy = torch.empty_like(y)
        dweight = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        if n:
            block = min(1024, triton.next_power_of_2(max(y.shape[1], 1)))
            _combine_bwd[(n,)](
                dout,
                y,
                d.place_of,
                weight,
                dy,
                dweight,
                y.shape[1],
                dout.stride(0),
                y.stride(0),
                dy.stride(0),
                TOPK=topk,
                BLOCK_H=block,
            )
        dx_rows, dw_gate_up, dw_down = _expert_grads(d, x, gu, h, dy, w_gate_up, w_down, topk, gather=True)
        dx = _combine_rows(dx_rows, d.place_of, None, n, topk, x.dtype)
        return dx, None, dweight.to(weight.dtype), dw_gate_up, dw_down


class GroupedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_sorted, counts, w_gate_up, w_down):
        x_sorted, w_gate_up, w_down = _contiguous(x_sorted, w_gate_up, w_down)
        d = dispatch_from_counts(counts, _gemm_blocks()["BLOCK_M"])
        train = any(ctx.needs_input_grad)
        gu, h = _gate_up(x_sorted, d, w_gate_up, x_sorted.shape[0], 1, save=train)
        y = _mm(h, d, w_down, w_down.shape[1], w_down.stride(2), w_down.stride(1))
        if train:
            ctx.save_for_backward(x_sorted, w_gate_up, w_down, gu, h)
            ctx.d = d
        return y

    @staticmethod
    def backward(ctx, dy):
        x_sorted, w_gate_up, w_down, gu, h = ctx.saved_tensors
        dx, dw_gate_up, dw_down = _expert_grads(
            ctx.d, x_sorted, gu, h, dy.contiguous(), w_gate_up, w_down, 1, gather=False
        )
        return dx, None, dw_gate_up, dw_down


def moe_experts_triton(x, topk_idx, topk_weight, w_gate_up, w_down):
    return MoEExpertsFunction.apply(x, topk_idx, topk_weight, w_gate_up, w_down)


def grouped_mlp_triton(x_sorted, counts, w_gate_up, w_down):
    return GroupedMLPFunction.apply(x_sorted, counts, w_gate_up, w_down)


def moe_permute_triton(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts) as the reference gives them (int64), from the Triton dispatch."""
    d = dispatch(topk_idx, num_experts, _gemm_blocks()["BLOCK_M"])
    return d.order.long(), d.counts.long()
