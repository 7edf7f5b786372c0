"""SwiGLU activation: silu(gate) * up, fused.

Casting follows PyTorch eager (and so transformers' MLP): silu is computed in fp32 and rounded to the
input dtype, then multiplied by `up` and rounded again. The backward saves only gate and up and
recomputes the activation: d_up = dc * silu(g), d_gate = dc * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))).

Triton: a 2-D grid (rows, column blocks); rows may have any stride, so gate and up can be the two
halves of one fused gate_up projection without a copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import tl, triton

BLOCK_COLS = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd(G, U, C, stride_g, stride_u, stride_c, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    gv = tl.load(G + row * stride_g + cols, mask=m, other=0.0)
    g = gv.to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(gv.dtype).to(tl.float32)
    tl.store(C + row * stride_c + cols, (act * u).to(C.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd(DC, G, U, DG, DU, stride_dc, stride_g, stride_u, stride_dg, stride_du, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    dc = tl.load(DC + row * stride_dc + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    act = g * sig
    tl.store(DU + row * stride_du + cols, (dc * act).to(DU.dtype.element_ty), mask=m)
    tl.store(DG + row * stride_dg + cols, (dc * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t2 = t.reshape(-1, n) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _grid(m: int, n: int, block: int) -> tuple[int, int]:
    return (m, triton.cdiv(n, block))


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor):
        if gate.shape != up.shape:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
        n = gate.shape[-1]
        g2, u2 = _rows(gate, n), _rows(up, n)
        m = g2.shape[0]
        out = torch.empty((m, n), dtype=torch.result_type(gate, up), device=gate.device)
        block = min(BLOCK_COLS, triton.next_power_of_2(max(n, 1)))
        if m and n:
            _swiglu_fwd[_grid(m, n, block)](g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), n, BLOCK=block)
        ctx.save_for_backward(g2, u2)
        ctx.shape, ctx.block = gate.shape, block
        return out.view(gate.shape)

    @staticmethod
    def backward(ctx, dc: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        m, n = g2.shape
        dc2 = _rows(dc, n)
        dg = torch.empty((m, n), dtype=g2.dtype, device=g2.device)
        du = torch.empty((m, n), dtype=u2.dtype, device=u2.device)
        if m and n:
            _swiglu_bwd[_grid(m, n, ctx.block)](
                dc2,
                g2,
                u2,
                dg,
                du,
                dc2.stride(0),
                g2.stride(0),
                u2.stride(0),
                dg.stride(0),
                du.stride(0),
                n,
                BLOCK=ctx.block,
            )
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(gate, up)
