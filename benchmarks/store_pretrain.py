"""Pretraining on token stores of growing size: peak resident memory, time to the first step, and the time
spent loading data per step (CPU).

    python -m benchmarks.store_pretrain [--sizes 20 300 2000]

For each size a jsonl corpus (benchmarks/corpus.py) is prepared once into a store (2 workers), then
`llm-scratch pretrain --data STORE --preset tiny` runs in a fresh process: its peak resident memory is
sampled every 0.05 s (psutil), the time to the first step is from the process's start to the first
training record in metrics.jsonl, and the data share is the trainer's own `data_s / step_s` (reading rows,
collating) over the steps after the first. Writes a dated table to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.corpus import CACHE, corpus, tokenizer
from benchmarks.report import RESULTS, write_table
from benchmarks.watch import watch

ROOT = Path(__file__).resolve().parents[1]
LLM = [sys.executable, "-m", "train.cli"]


def store(mb: int) -> Path:
    out = CACHE / f"store-{mb}mb"
    subprocess.run(
        [
            *LLM,
            "prepare",
            "--data",
            str(corpus(mb)),
            "--tokenizer",
            str(tokenizer()),
            "--out",
            str(out),
            "--workers",
            "2",
            "--quiet",
        ],
        check=True,
        cwd=ROOT,
    )
    return out


def pretrain(st: Path, steps: int, out: Path) -> dict:
    cmd = [
        *LLM,
        "pretrain",
        "--data",
        str(st),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--seq-len",
        "256",
        "--batch-size",
        "8",
        "--max-steps",
        str(steps),
        "--eval-every",
        "0",
        "--save-every",
        str(10 * steps),
        "--no-progress",
    ]
    metrics = out / "metrics.jsonl"
    run = watch(cmd, metrics)
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if '"step_s"' in line]
    share = statistics.mean(r["data_s"] / r["step_s"] for r in recs[1:])
    data_ms = statistics.mean(r["data_s"] for r in recs[1:]) * 1e3
    step_ms = statistics.mean(r["step_s"] for r in recs[1:]) * 1e3
    peak, first = run["peak_mb"], run["first_s"]
    return {"peak_mb": peak, "first_step_s": first, "share": share, "data_ms": data_ms, "step_ms": step_ms}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 300, 2000], help="corpus sizes in MB")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prepare-only", action="store_true", help="prepare the stores and stop")
    ns = ap.parse_args(argv)
    rows = []
    stores = {mb: store(mb) for mb in ns.sizes}  # all prepared first, so the runs below are timed back to back
    if ns.prepare_only:
        return RESULTS
    for mb in ns.sizes:
        st = stores[mb]
        manifest = json.loads((st / "manifest.json").read_text())
        disk = sum(p.stat().st_size for p in st.iterdir() if p.is_file())
        with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
            r = pretrain(st, ns.steps, Path(tmp) / "run")
        rows.append((mb, manifest["tokens"], disk, r))
    base = rows[0][3]["peak_mb"]
    date = dt.date.today().isoformat()
    lines = [
        f"# Pretraining on token stores of growing size ({date})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"`python -m benchmarks.store_pretrain --sizes {' '.join(map(str, ns.sizes))}`: `pretrain --preset tiny "
        f"--seq-len 256 --batch-size 8 --max-steps {ns.steps}` on each store. Goals: peak memory within 10% "
        "(or 150 MB) of the smallest store's, first step within 10 s, data loading at most 1% of a step.",
        "",
        "| corpus | tokens | store on disk | peak memory (MB) | vs smallest | first step (s) | data per step (ms) "
        "| step (ms) | data share |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mb, tokens, disk, r in rows:
        lines.append(
            f"| {mb} MB | {tokens / 1e6:.0f} M | {disk / 1e6:.0f} MB | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] - base:+.0f} MB | {r['first_step_s']:.1f} | {r['data_ms']:.2f} | {r['step_ms']:.0f} | "
            f"{100 * r['share']:.2f}% |"
        )
    return write_table(lines, f"{date}-cpu-store-pretrain.md")


if __name__ == "__main__":
    main()
