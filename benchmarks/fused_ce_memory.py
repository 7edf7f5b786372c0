"""Peak memory of the LM head's loss and backward: materialised logits against the fused linear +
cross-entropy op (CPU).

    python -m benchmarks.fused_ce_memory                 # vocab 32k and 152k, 8192 tokens, hidden 896

Each configuration runs in a fresh process: hidden states h [tokens, hidden] and the head's weight
[vocab, hidden] (fp32) are made, then the loss of h @ W^T and its backward run, and the process's peak
resident memory (ru_maxrss) is read before and after. "Materialised" is what the models did before the
fused head: the logits in fp32 and F.cross_entropy over them. "Fused" is kernels.linear_cross_entropy with
the PyTorch row function (the Triton one only runs on a CPU through the interpreter, which is no measure;
both hold the same chunk of logits). The table gives the step's own peak (what it added over the inputs)
and the ratio fused / materialised; the goal is at most a quarter. Writes a dated table to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
from pathlib import Path

import torch

from benchmarks.report import write_table
from benchmarks.watch import child_json

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
import torch
import torch.nn.functional as F
import kernels
mode = sys.argv[1]
vocab, tokens, hidden = (int(a) for a in sys.argv[2:5])
torch.manual_seed(0)
h = torch.randn(tokens, hidden, requires_grad=True)
w = (0.02 * torch.randn(vocab, hidden)).requires_grad_()
t = torch.randint(0, vocab, (tokens,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "materialised":
    loss = F.cross_entropy((h @ w.t()).float(), t)
else:
    loss = kernels.linear_cross_entropy(h, w, t, backend="torch")
loss.backward()
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mb": before / 1024, "after_mb": after / 1024, "seconds": seconds, "loss": loss.item()}))
"""


def _measure(mode: str, vocab: int, tokens: int, hidden: int) -> dict:
    return child_json(CHILD, mode, vocab, tokens, hidden)


def run(vocabs: list[int], tokens: int, hidden: int, out_dir: Path | None = None) -> Path:
    date = dt.date.today().isoformat()
    lines = [
        f"# LM head loss + backward: materialised logits vs the fused linear cross-entropy ({date})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; "
        f"`python -m benchmarks.fused_ce_memory --vocab {' '.join(map(str, vocabs))} --tokens {tokens} "
        f"--hidden {hidden}`. fp32; step peak = the process's peak resident memory after the loss and backward "
        "minus before them. Goal: fused at most 1/4 of materialised.",
        "",
        "| vocab | tokens | way | step peak (MB) | fused / materialised | seconds | loss |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for vocab in vocabs:
        rows = {mode: _measure(mode, vocab, tokens, hidden) for mode in ("materialised", "fused")}
        base = rows["materialised"]["after_mb"] - rows["materialised"]["before_mb"]
        for mode, r in rows.items():
            peak = r["after_mb"] - r["before_mb"]
            ratio = "1.00" if mode == "materialised" else (f"{peak / base:.2f}" if base > 0 else "-")
            lines.append(
                f"| {vocab:,} | {tokens:,} | {mode} | {peak:,.0f} | {ratio} | {r['seconds']:.2f} | {r['loss']:.4f} |"
            )
    return write_table(lines, f"{date}-cpu-fused-ce-memory.md", out_dir)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32_000, 151_936])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=896)
    ns = ap.parse_args(argv)
    return run(ns.vocab, ns.tokens, ns.hidden)


if __name__ == "__main__":
    main()
