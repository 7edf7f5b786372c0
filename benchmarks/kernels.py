"""Kernel benchmarks: each op's forward, backward and forward+backward against PyTorch eager,
torch.compile and Liger-Kernel (when importable), with achieved bandwidth as a share of the device's
copy bandwidth measured in the same run, and peak memory.

    python -m benchmarks.kernels                # on a GPU: bf16, hidden 1024-8192, 4k-64k tokens
    python -m benchmarks.kernels --smoke        # anywhere (CPU: the interpreter), tiny shapes: checks the script

Bytes counted are what the op must move at least (each input read once, each output written once):
    rms_norm  fwd: x, y           bwd: dy, x, dx              (weight and 1/rms are negligible)
    swiglu    fwd: gate, up, out  bwd: dout, gate, up, dgate, dup
    rope      fwd: q, k, q', k'   bwd: dq', dk', dq, dk       (cos/sin: one row per token, counted)
GB/s = bytes / median time, the same count for every provider. Timing: triton.testing.do_bench
(median of repeated runs after warm-up, L2 flushed between runs) on CUDA; a plain median timer on CPU.
The table goes to benchmarks/results/DATE-DEVICE-kernels.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import kernels
from kernels.rms_norm import rms_norm_reference
from kernels.rope import apply_rope_reference
from kernels.swiglu import swiglu_reference

RESULTS = Path(__file__).parent / "results"
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Case:
    op: str
    hidden: int
    tokens: int
    make: Callable[[], tuple]  # -> (inputs requiring grad, extra args)
    bytes: dict[str, float]


def _bench(fn: Callable[[], object], device: str, grad_to_none=None) -> float:
    """Median milliseconds."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, dtype: torch.dtype, n_bytes: int) -> float:
    """GB/s of a large device-to-device copy (read + write counted)."""
    n = n_bytes // torch.finfo(dtype).bits * 8
    src = torch.randn(n, device=device).to(dtype)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / ms / 1e6


# --------------------------------------------------------------------------------------------- ops


def _liger():
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return {
        "rms_norm": lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False),
        "swiglu": lambda g, u: LigerSiLUMulFunction.apply(g, u),
        # Liger's RoPE takes the half layout, cos/sin [B or 1, T, D]
        "apply_rope": lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin),
    }


def providers(device: str, compile_: bool) -> dict[str, dict[str, Callable]]:
    out = {
        "ours (triton)": {
            "rms_norm": lambda x, w: kernels.rms_norm(x, w, 1e-6, backend="triton"),
            "swiglu": lambda g, u: kernels.swiglu(g, u, backend="triton"),
            "apply_rope": lambda q, k, c, s: kernels.apply_rope(q, k, c, s, backend="triton"),
        },
        "torch eager": {
            "rms_norm": lambda x, w: rms_norm_reference(x, w, 1e-6),
            "swiglu": swiglu_reference,
            "apply_rope": lambda q, k, c, s: apply_rope_reference(q, k, c, s),
        },
    }
    if compile_:
        out["torch.compile"] = {
            "rms_norm": torch.compile(lambda x, w: rms_norm_reference(x, w, 1e-6), dynamic=True),
            "swiglu": torch.compile(swiglu_reference, dynamic=True),
            "apply_rope": torch.compile(lambda q, k, c, s: apply_rope_reference(q, k, c, s), dynamic=True),
        }
    liger = _liger() if device == "cuda" else None
    if liger:
        out["Liger-Kernel"] = liger
    return out


def cases(device: str, dtype: torch.dtype, hiddens: list[int], token_counts: list[int]) -> list[Case]:
    s = torch.finfo(dtype).bits // 8
    out = []
    for h in hiddens:
        for n in token_counts:

            def rms(h=h, n=n):
                x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
                w = torch.randn(h, device=device, dtype=dtype, requires_grad=True)
                return (x, w), ()

            out.append(Case("rms_norm", h, n, rms, {"fwd": 2 * n * h * s, "bwd": 3 * n * h * s}))

            def swi(h=h, n=n):
                g = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
                u = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
                return (g, u), ()

            out.append(Case("swiglu", h, n, swi, {"fwd": 3 * n * h * s, "bwd": 5 * n * h * s}))

            head_dim = 128 if h >= 128 else h
            hq = max(1, h // head_dim)
            hk = max(1, hq // 4)  # GQA 4:1
            batch, seq = max(1, n // 4096), min(n, 4096)

            def rope(hq=hq, hk=hk, batch=batch, seq=seq, head_dim=head_dim):
                from models.layers import RotaryEmbedding

                q = torch.randn(batch, seq, hq, head_dim, device=device, dtype=dtype).transpose(1, 2)
                k = torch.randn(batch, seq, hk, head_dim, device=device, dtype=dtype).transpose(1, 2)
                pos = torch.arange(seq, device=device).expand(batch, seq)
                cos, sin = RotaryEmbedding(head_dim, 1e6).to(device)(pos, dtype)
                return (q.requires_grad_(), k.requires_grad_()), (cos, sin)

            qk = batch * seq * (hq + hk) * head_dim * s
            cs = 2 * batch * seq * head_dim * s
            out.append(Case("apply_rope", h, n, rope, {"fwd": 2 * qk + cs, "bwd": 2 * qk + cs}))
    return out


def measure(case: Case, fn: Callable, device: str) -> dict[str, float]:
    inputs, extra = case.make()
    result = {}

    def forward():
        return fn(*inputs, *extra)

    def loss_of(out):
        return out if torch.is_tensor(out) else torch.cat([o.reshape(-1) for o in out])

    result["fwd"] = _bench(forward, device)
    out = loss_of(forward())
    grad = torch.randn_like(out)
    result["bwd"] = _bench(lambda: out.backward(grad, retain_graph=True), device, grad_to_none=list(inputs))

    def both():
        loss_of(forward()).backward(grad)

    result["fwd+bwd"] = _bench(both, device, grad_to_none=list(inputs))
    if device == "cuda":
        del out
        for t in inputs:
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        both()
        torch.cuda.synchronize()
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return result


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return "cpu (Triton interpreter)"


def run(smoke: bool, out_dir: Path = RESULTS, compile_: bool = True) -> Path:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        hiddens, token_counts, copy_bytes = [64], [8], 1 << 20
    else:
        if device != "cuda":
            raise SystemExit("the kernel benchmark needs a GPU; use --smoke to check the script on CPU")
        dtype = torch.bfloat16
        hiddens, token_counts, copy_bytes = [1024, 4096, 8192], [4096, 16384, 65536], 1 << 30
    copy_gbs = copy_bandwidth(device, dtype, copy_bytes)
    provs = providers(device, compile_ and not smoke)
    rows = []
    for case in cases(device, dtype, hiddens, token_counts):
        for name, fns in provs.items():
            r = measure(case, fns[case.op], device)
            rows.append((case, name, r))
            print(
                f"{case.op:10s} h={case.hidden:5d} n={case.tokens:6d} {name:14s} "
                + "  ".join(f"{m} {r[m]:.3f} ms" for m in MODES),
                flush=True,
            )
    return write_table(rows, device, dtype, copy_gbs, out_dir, smoke)


def results_path(out_dir: Path, device: str, kind: str, smoke: bool) -> tuple[Path, str, str]:
    """(benchmarks/results/DATE-DEVICE-KIND[-smoke].md, the device's name, the date)."""
    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    date = dt.date.today().isoformat()
    return out_dir / f"{date}-{slug}-{kind}{'-smoke' if smoke else ''}.md", name, date


def write_table(rows, device, dtype, copy_gbs, out_dir: Path, smoke: bool) -> Path:
    path, name, date = results_path(out_dir, device, "kernels", smoke)
    lines = [
        f"# Kernels: RMSNorm, SwiGLU, RoPE on {name} ({date})",
        "",
        f"dtype {str(dtype).removeprefix('torch.')}, torch {torch.__version__}"
        + (f", triton {__import__('triton').__version__}" if kernels.HAS_TRITON else "")
        + f". Device copy bandwidth measured in this run: **{copy_gbs:,.0f} GB/s**. "
        "Time: median ms; GB/s: minimum bytes the op must move / time (see benchmarks/kernels.py); "
        "% copy: that as a share of the copy bandwidth; peak: extra memory of one forward+backward.",
        "",
        "| op | hidden | tokens | provider | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd GB/s | % copy | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, prov, r in rows:
        total = case.bytes["fwd"] + case.bytes["bwd"]
        gbs = total / r["fwd+bwd"] / 1e6
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        lines.append(
            f"| {case.op} | {case.hidden} | {case.tokens} | {prov} | {r['fwd']:.3f} | {r['bwd']:.3f} | "
            f"{r['fwd+bwd']:.3f} | {gbs:,.0f} | {100 * gbs / copy_gbs:.0f}% | {peak} |"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return path


def bench_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks that the script runs")
    p.add_argument("--out", default=str(RESULTS))
    return p


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    ns = p.parse_args(argv)
    run(ns.smoke, Path(ns.out), compile_=not ns.no_compile)


if __name__ == "__main__":
    main()
