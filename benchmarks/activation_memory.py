"""Peak memory of one training step with and without activation checkpointing (CPU).

    python -m benchmarks.activation_memory            # dense `small` preset, 8 rows of 1024 tokens

Each configuration runs in a fresh process: the model is built, one forward and backward run, and the
process's peak resident memory (ru_maxrss) is read before and after the step. The table gives the step's
own peak (what the step added over the built model: activations kept for the backward, gradients, the
allocator's slack) and the process's peak. Writes a dated table to benchmarks/results/.
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
from models import DenseLM, MoELM, make_config
kind, preset = sys.argv[1], sys.argv[2]
seq, every, batch, vocab = (int(a) for a in sys.argv[3:7])
torch.manual_seed(0)
sizes = {"max_position_embeddings": max(seq, 1024), **({"vocab_size": vocab} if vocab else {})}
model = (DenseLM if kind == "dense" else MoELM)(make_config(kind, preset, **sizes)).train()
model.set_activation_checkpointing(every)
ids = torch.randint(0, model.config.vocab_size, (batch, seq))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
model(ids, targets=ids).loss.backward()
seconds = time.perf_counter() - t
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mb": before / 1024, "after_mb": after / 1024, "seconds": seconds,
                  "params": sum(p.numel() for p in model.parameters())}))
"""


def _measure(kind: str, preset: str, seq: int, every: int, batch: int, vocab: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    return child_json(CHILD, kind, preset, seq, every, batch, vocab, env=env)


def run(
    kind: str = "dense", preset: str = "small", seq: int = 1024, batch: int = 8, out_dir: Path | None = None
) -> Path:
    rows = []
    for vocab in (0, 512):  # the preset's vocabulary, then a small one: how much of the rest is the logits
        for every in (0, 1, 2):
            m = _measure(kind, preset, seq, every, batch, vocab)
            rows.append((vocab, every, m["after_mb"] - m["before_mb"], m["after_mb"], m["seconds"], m["params"]))
    date = dt.date.today().isoformat()
    from models import make_config

    preset_vocab = make_config(kind, preset).vocab_size
    lines = [
        f"# Activation checkpointing: peak memory of one training step ({date}, cpu)",
        "",
        f"Device: {platform.processor() or platform.machine()}; {os.cpu_count()} CPU cores; "
        f"torch {torch.__version__}. Model: `{preset}` {kind} preset ({rows[0][5] / 1e6:.1f}M parameters with its "
        f"vocabulary of {preset_vocab}), fp32, {batch} rows of {seq} tokens, one forward and backward in a fresh "
        "process; peak resident memory (ru_maxrss). "
        "Produced by `python -m benchmarks.activation_memory`.",
        "",
        "| vocabulary | checkpointed layers | step's own peak (MB) | vs none | process peak (MB) | step time (s) |",
        "|---|---|---|---|---|---|",
    ]
    names = {0: "none", 1: "every layer", 2: "every 2nd layer"}
    base = {}
    for vocab, every, step_mb, total_mb, seconds, _ in rows:
        base.setdefault(vocab, step_mb)
        lines.append(
            f"| {vocab or preset_vocab} | {names[every]} | {step_mb:,.0f} | {step_mb / base[vocab]:.2f}x "
            f"| {total_mb:,.0f} | {seconds:.2f} |"
        )
    lines += [
        "",
        "The step's own peak is what the step added over the built model (activations kept for the backward, "
        "gradients, allocator slack); gradients are the same size in every row, so the activations' share "
        "shrinks by more than the ratio shows. Recomputation costs about one more forward per checkpointed layer.",
    ]
    return write_table(lines, f"{date}-cpu-activation-memory.md", out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="dense", choices=("dense", "moe"))
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ns = ap.parse_args()
    run(ns.kind, ns.preset, ns.seq_len, ns.batch_size)


if __name__ == "__main__":
    main()
