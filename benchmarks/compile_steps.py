"""Training step time with and without `--compile` (each decoder layer through torch.compile), CPU.

    python -m benchmarks.compile_steps          # dense and MoE `tiny` presets, 8 rows of 256 tokens

Forward, backward and an AdamW step on random tokens, in this process; the median over the steps after
the warm-up (the first compiled steps pay the compilation, reported apart). Writes a dated table to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import write_table


def _steps(kind: str, compiled: bool, batch: int, seq: int, steps: int, warmup: int) -> tuple[float, float]:
    from models import DenseLM, MoELM, make_config

    torch.manual_seed(0)
    model = (DenseLM if kind == "dense" else MoELM)(make_config(kind, "tiny")).train()
    if compiled:
        model.compile_layers()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        model(ids, targets=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return sum(times[:warmup]), statistics.median(times[warmup:])


def run(batch: int = 8, seq: int = 256, steps: int = 10, warmup: int = 3, out_dir: Path | None = None) -> Path:
    rows = []
    for kind in ("dense", "moe"):
        _, eager = _steps(kind, False, batch, seq, steps, warmup)
        first, compiled = _steps(kind, True, batch, seq, steps, warmup)
        rows.append((kind, eager, compiled, first))
    date = dt.date.today().isoformat()
    lines = [
        f"# torch.compile per decoder layer: training step time ({date}, cpu)",
        "",
        f"Device: {platform.processor() or platform.machine()}; {os.cpu_count()} CPU cores; "
        f"torch {torch.__version__}. `tiny` presets, fp32, {batch} rows of {seq} tokens, forward + backward + "
        f"AdamW; median of {steps} steps after {warmup} warm-up steps. "
        "Produced by `python -m benchmarks.compile_steps`.",
        "",
        "| model | eager step (s) | compiled step (s) | speed-up | compiled warm-up steps (s, compilation included) |",
        "|---|---|---|---|---|",
    ]
    for kind, eager, compiled, first in rows:
        lines.append(f"| {kind} | {eager:.3f} | {compiled:.3f} | {eager / compiled:.2f}x | {first:.1f} |")
    lines += [
        "",
        "The MoE layers break the compiled graph where their dispatch depends on the routing (tokens per expert "
        "are data: `bincount`, the segment table's sizes), so only the parts between those points are fused.",
    ]
    return write_table(lines, f"{date}-cpu-compile-steps.md", out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ns = ap.parse_args()
    run(ns.batch_size, ns.seq_len, ns.steps)


if __name__ == "__main__":
    main()
