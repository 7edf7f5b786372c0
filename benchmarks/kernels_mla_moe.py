"""Benchmarks of the matmul-bound kernels: MLA training attention, MLA decoding, the MoE layer.

    python -m benchmarks.kernels_mla_moe            # on a GPU: bf16, DeepSeek-like shapes
    python -m benchmarks.kernels_mla_moe --smoke    # anywhere (CPU: the interpreter), tiny shapes

Each row is quoted against a ceiling measured in the same run:
- MLA training forward+backward, causal, qk head dim 128+64 and v 128: FLOPs = 3.5 x the forward's
  2*B*H*T^2/2*(Dqk + Dv) (the backward does 2.5x the forward's matmul work); TFLOP/s and its share of a
  large bf16 matmul's rate. Baselines: SDPA on q/k of 192 with V zero-padded to 192 (so the flash backend
  applies; the padded output is sliced), and the reference (the concatenation + SDPA with V of 128).
- MLA decoding over the latent cache (512 + 64 per token, one query per sequence): bytes = the cache
  (latent + rope key) + queries + output; GB/s and its share of a device-to-device copy.
  Baseline: the reference (SDPA over the concatenated cache, enable_gqa).
- MoE layer (routed experts only) forward+backward, 64 experts, top-6, hidden 2048, expert hidden 1408:
  FLOPs = 3 x 2 x (N*K) x H x 3I; TFLOP/s of the expert GEMMs. Baselines: the per-expert loop and a
  `torch._grouped_mm` path (permute by argsort, grouped gate/up, SwiGLU, grouped down, weighted
  index_add), where that op exists.
The table goes to benchmarks/results/DATE-DEVICE-mla-moe.md.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.kernels import RESULTS, _bench, bench_parser, copy_bandwidth, results_path
from kernels.mla_attention import mla_attention_reference, mla_decode_reference
from kernels.mla_attention_triton import mla_attention_triton, mla_decode_triton
from kernels.moe_dispatch import moe_experts_reference
from kernels.moe_dispatch_triton import moe_experts_triton


def matmul_rate(device: str, dtype: torch.dtype, n: int) -> float:
    """TFLOP/s of an n x n x n matmul."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    ms = _bench(lambda: a @ b, device)
    return 2 * n**3 / ms / 1e9


def _fwd_bwd(fn: Callable, inputs: list[torch.Tensor], device: str) -> float:
    out = fn()
    grad = torch.randn_like(out)

    def both():
        fn().backward(grad)

    return _bench(both, device, grad_to_none=inputs)


# ------------------------------------------------------------------------- MLA training


def _sdpa_padded(q_nope, q_rope, k_nope, k_rope, v, scale):
    h = q_nope.shape[1]
    q = torch.cat((q_nope, q_rope), -1)
    k = torch.cat((k_nope, k_rope.expand(-1, h, -1, -1)), -1)
    v_pad = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    return F.scaled_dot_product_attention(q, k, v_pad, is_causal=True, scale=scale)[..., : v.shape[-1]]


def mla_train_rows(device, dtype, shapes, peak_tflops):
    return [row for shape in shapes for row in _mla_train_case(device, dtype, *shape, peak_tflops)]


def _mla_train_case(device, dtype, heads, tokens, dn, dr, dv, peak_tflops):
    def r(*s):
        return torch.randn(*s, device=device, dtype=dtype, requires_grad=True)

    scale = (dn + dr) ** -0.5
    flops = 3.5 * 2 * heads * tokens * tokens / 2 * (dn + dr + dv)
    rows = []
    for name, fn in {
        "ours (triton)": mla_attention_triton,
        "SDPA, V padded": _sdpa_padded,
        "reference (SDPA)": mla_attention_reference,
    }.items():
        x = [
            r(1, heads, tokens, dn),
            r(1, heads, tokens, dr),
            r(1, heads, tokens, dn),
            r(1, 1, tokens, dr),
            r(1, heads, tokens, dv),
        ]
        ms = _fwd_bwd(lambda fn=fn, x=x: fn(*x, scale), x, device)
        tf = flops / ms / 1e9
        rows.append(
            (
                "mla train fwd+bwd",
                f"H={heads} T={tokens} qk={dn}+{dr} v={dv}",
                name,
                ms,
                f"{tf:.1f} TFLOP/s",
                f"{100 * tf / peak_tflops:.0f}% matmul",
            )
        )
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------- MLA decoding


def mla_decode_rows(device, dtype, shapes, copy_gbs):
    return [row for shape in shapes for row in _mla_decode_case(device, dtype, *shape, copy_gbs)]


def _mla_decode_case(device, dtype, batch, cache, heads, r, dr, copy_gbs):
    ql = torch.randn(batch, heads, 1, r, device=device, dtype=dtype)
    qr = torch.randn(batch, heads, 1, dr, device=device, dtype=dtype)
    c = torch.randn(batch, cache, r, device=device, dtype=dtype)
    kr = torch.randn(batch, cache, dr, device=device, dtype=dtype)
    scale = (128 + dr) ** -0.5
    size = dtype.itemsize
    n_bytes = batch * cache * (r + dr) * size + batch * heads * (2 * r + dr) * size
    rows = []
    for name, fn in {"ours (triton)": mla_decode_triton, "reference (SDPA)": mla_decode_reference}.items():
        ms = _bench(lambda fn=fn: fn(ql, qr, c, kr, scale), device)
        gbs = n_bytes / ms / 1e6
        rows.append(
            (
                "mla decode",
                f"B={batch} S={cache} H={heads} R={r}+{dr}",
                name,
                ms,
                f"{gbs:,.0f} GB/s",
                f"{100 * gbs / copy_gbs:.0f}% copy",
            )
        )
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------- MoE layer


def grouped_mm_experts(x, topk_idx, topk_weight, w_gate_up, w_down):
    """The routed experts through torch._grouped_mm (the baseline the issue names)."""
    n, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=w_gate_up.shape[0]), 0).to(torch.int32)
    xs = x[order // k]
    gu = torch._grouped_mm(xs, w_gate_up.transpose(1, 2), offs=offs)
    inter = w_down.shape[-1]
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs)
    y = y * topk_weight.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add(0, order // k, y)


def moe_rows(device, dtype, shapes, peak_tflops):
    return [row for shape in shapes for row in _moe_case(device, dtype, *shape, peak_tflops)]


def _moe_case(device, dtype, tokens, experts, topk, hidden, inter, peak_tflops):
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    weight, idx = torch.topk(torch.randn(tokens, experts, device=device).softmax(-1), topk, dim=-1)
    weight = weight.to(dtype).requires_grad_()
    w_gate_up = (torch.randn(experts, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
    w_down = (torch.randn(experts, hidden, inter, device=device) / inter**0.5).to(dtype).requires_grad_()
    inputs = [x, weight, w_gate_up, w_down]
    flops = 3 * 2 * tokens * topk * hidden * 3 * inter
    shape = f"N={tokens} E={experts} k={topk} H={hidden} I={inter}"
    provs = {"ours (triton)": moe_experts_triton, "per-expert loop": moe_experts_reference}
    if hasattr(torch, "_grouped_mm"):
        provs["torch._grouped_mm"] = grouped_mm_experts
    rows = []
    for name, fn in provs.items():
        try:
            ms = _fwd_bwd(lambda fn=fn: fn(x, idx, weight, w_gate_up, w_down), inputs, device)
        except RuntimeError as e:  # e.g. _grouped_mm not supported for this dtype or device
            rows.append(("moe layer fwd+bwd", shape, name, float("nan"), f"failed: {str(e).splitlines()[0][:60]}", ""))
            continue
        tf = flops / ms / 1e9
        rows.append(
            ("moe layer fwd+bwd", shape, name, ms, f"{tf:.1f} TFLOP/s", f"{100 * tf / peak_tflops:.0f}% matmul")
        )
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------- driver


def run(smoke: bool, out_dir: Path = RESULTS) -> Path:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        train = [(2, 32, 16, 8, 16)]
        decode = [(2, 64, 2, 32, 16)]
        moe = [(24, 5, 2, 32, 16)]
        copy_bytes, mm = 1 << 20, 256
    else:
        if device != "cuda":
            raise SystemExit("this benchmark needs a GPU; use --smoke to check the script on CPU")
        dtype = torch.bfloat16
        train = [(h, t, 128, 64, 128) for h in (16, 128) for t in (2048, 8192)]
        decode = [
            (b, s, h, 512, 64)
            for b in (1, 32, 128)
            for s in (1024, 8192, 32768)
            for h in (16, 128)
            if b * s <= 128 * 8192
        ]
        moe = [(n, 64, 6, 2048, 1408) for n in (4096, 16384, 32768)]
        copy_bytes, mm = 1 << 30, 8192
    copy_gbs = copy_bandwidth(device, dtype, copy_bytes)
    peak = matmul_rate(device, dtype, mm)
    rows = mla_train_rows(device, dtype, train, peak) + mla_decode_rows(device, dtype, decode, copy_gbs)
    rows += moe_rows(device, dtype, moe, peak)
    path, name, date = results_path(out_dir, device, "mla-moe", smoke)
    lines = [
        f"# Kernels: MLA attention, MLA decoding, MoE layer on {name} ({date})",
        "",
        f"dtype {str(dtype).removeprefix('torch.')}, torch {torch.__version__}. Measured in this run: "
        f"copy bandwidth **{copy_gbs:,.0f} GB/s**, {mm}^3 matmul **{peak:,.1f} TFLOP/s**. "
        "Time: median ms (see benchmarks/kernels_mla_moe.py for the FLOP and byte counts).",
        "",
        "| op | shape | provider | ms | rate | share |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {op} | {shape} | {prov} | {ms:.3f} | {rate} | {share} |" for op, shape, prov, ms, rate, share in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    ns = bench_parser(__doc__).parse_args(argv)
    run(ns.smoke, Path(ns.out))


if __name__ == "__main__":
    main()
