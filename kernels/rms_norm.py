"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight.

Casting follows Qwen2's RMSNorm exactly: normalize in fp32, cast to the input dtype, then multiply
by the weight (the output has the promoted dtype of input and weight, as in transformers).

Triton: the forward is one program per row; it caches each row's 1/rms (fp32) for the backward.
The backward uses P programs, each looping over rows p, p+P, ...; each writes dx for its rows and keeps
a partial weight gradient in fp32, stored as row p of a [P, H] buffer that is then summed in a fixed
order, so the weight gradient is deterministic (no atomics). Rows wider than MAX_ROW_BLOCK are
processed in chunks (two passes over the row).

Backward math, with xh = x * rstd and g = dy * w: dx = rstd * (g - xh * mean(g * xh)), dw = sum_rows dy * xh.
"""

from __future__ import annotations

import torch

from ._triton import num_warps_for, programs_for_reduction, row_block, tl, triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, BLOCK: tl.constexpr, CHUNKED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK)
    if CHUNKED:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            m = start + cols < N
            x = tl.load(x_row + start + cols, mask=m, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            m = start + cols < N
            xv = tl.load(x_row + start + cols, mask=m, other=0.0)
            w = tl.load(W + start + cols, mask=m, other=0.0).to(tl.float32)
            xh = (xv.to(tl.float32) * rstd).to(xv.dtype).to(tl.float32)
            tl.store(y_row + start + cols, (xh * w).to(Y.dtype.element_ty), mask=m)
    else:
        m = cols < N
        xv = tl.load(x_row + cols, mask=m, other=0.0)
        x = xv.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        xh = (x * rstd).to(xv.dtype).to(tl.float32)  # Qwen2: cast to the input dtype before the weight
        tl.store(y_row + cols, (xh * w).to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PART,
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_program,
    BLOCK: tl.constexpr,
    CHUNKED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 row offsets: rows x stride may pass 2^31
    cols = tl.arange(0, BLOCK)
    row_start = pid * rows_per_program
    dw_row = DW_PART + pid * N
    # every program runs the same trip count; rows past the end are masked out
    if CHUNKED:
        for i in range(rows_per_program):
            r = row_start + i
            n_valid = tl.where(r < M, N, 0)  # a row past the end masks every column (no scalar masks:
            rstd = tl.load(RSTD + tl.minimum(r, M - 1))  # the interpreter rejects them)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                m = start + cols < n_valid
                x = tl.load(X + r * stride_x + start + cols, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + r * stride_dy + start + cols, mask=m, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=m, other=0.0).to(tl.float32)
                acc += dy * w * x * rstd
            c = tl.sum(acc, axis=0) / N
            for start in range(0, N, BLOCK):
                m = start + cols < n_valid
                xv = tl.load(X + r * stride_x + start + cols, mask=m, other=0.0)
                xh = xv.to(tl.float32) * rstd
                dy = tl.load(DY + r * stride_dy + start + cols, mask=m, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=m, other=0.0).to(tl.float32)
                dx = rstd * (dy * w - xh * c)
                tl.store(DX + r * stride_dx + start + cols, dx.to(DX.dtype.element_ty), mask=m)
                part = tl.load(dw_row + start + cols, mask=m, other=0.0)
                tl.store(dw_row + start + cols, part + dy * xh.to(xv.dtype).to(tl.float32), mask=m)
    else:
        cm = cols < N
        w = tl.load(W + cols, mask=cm, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(rows_per_program):
            r = row_start + i
            m = cols < tl.where(r < M, N, 0)  # a row past the end masks every column (no scalar masks:
            rstd = tl.load(RSTD + tl.minimum(r, M - 1))  # the interpreter rejects them)
            xv = tl.load(X + r * stride_x + cols, mask=m, other=0.0)
            xh = xv.to(tl.float32) * rstd
            dy = tl.load(DY + r * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
            g = dy * w
            c = tl.sum(g * xh, axis=0) / N
            dx = rstd * (g - xh * c)
            tl.store(DX + r * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
            dw += dy * xh.to(xv.dtype).to(tl.float32)
        tl.store(dw_row + cols, dw, mask=cm)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, max_block: int | None = None):
        n = x.shape[-1]
        x2 = _rows(x, n)
        m = x2.shape[0]
        out_dtype = torch.result_type(x, weight)
        y = torch.empty((m, n), dtype=out_dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block = row_block(n, max_block) if max_block else row_block(n)
        if m:
            _rms_norm_fwd[(m,)](
                x2,
                weight,
                y,
                rstd,
                x2.stride(0),
                y.stride(0),
                n,
                eps,
                BLOCK=block,
                CHUNKED=n > block,
                num_warps=num_warps_for(block),
            )
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape, ctx.block = x.shape, block
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        n = x2.shape[1]
        m = x2.shape[0]
        dy2 = _rows(dy, n)
        dx = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
        programs = programs_for_reduction(m, x2.device)
        rows_per_program = triton.cdiv(m, programs) if m else 1
        dw_part = torch.zeros((programs, n), dtype=torch.float32, device=x2.device)
        block = ctx.block
        if m:
            _rms_norm_bwd[(programs,)](
                dy2,
                x2,
                weight,
                rstd,
                dx,
                dw_part,
                dy2.stride(0),
                x2.stride(0),
                dx.stride(0),
                m,
                n,
                rows_per_program,
                BLOCK=block,
                CHUNKED=n > block,
                num_warps=num_warps_for(block),
            )
        dw = dw_part.sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dw, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)
