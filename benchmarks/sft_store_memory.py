"""SFT on conversation sets of growing size: peak resident memory and time to the first step (CPU).

    python -m benchmarks.sft_store_memory [--sizes 20000 200000]

For each size a jsonl of that many conversations (the embedded generator's, in seeded shuffled order,
benchmarks/corpus.py) is prepared once into an SFT store (`prepare --kind sft`, 2 workers); then
`llm-scratch sft --data STORE` starts from a one-step micro model in a fresh process, and its peak resident
memory (psutil, every 0.05 s) and the time from its start to its first training record are measured, beside
the same for the in-memory path that reads the jsonl records (a VLM's way, and every stage's before the
store), at the smallest size. Writes a dated table to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.corpus import CACHE, conversations, tokenizer
from benchmarks.report import write_table
from benchmarks.watch import watch

ROOT = Path(__file__).resolve().parents[1]
LLM = [sys.executable, "-m", "train.cli"]

IN_MEMORY = r"""
import sys
from train.data.finetune import build_sft_examples
from train.data.formats import load_sft
from train.data.tokenizer import load_tokenizer
path, tok = sys.argv[1], sys.argv[2]
ex, dropped = build_sft_examples(load_tokenizer(tok), load_sft(path), 256)
print(len(ex), dropped, flush=True)
"""


def init_model(tmp: Path) -> Path:
    out = CACHE / "sft-init"
    if not (out / "summary.json").exists():
        subprocess.run(
            [
                *LLM,
                "pretrain",
                "--data",
                str(CACHE / "pool.jsonl"),
                "--tokenizer",
                str(tokenizer()),
                "--out",
                str(out),
                "--preset",
                "micro",
                "--max-steps",
                "1",
                "--eval-every",
                "0",
                "--no-progress",
            ],
            check=True,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
    return out


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    ns = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        init = init_model(Path(tmp))
        for n in ns.sizes:
            src = conversations(n)
            store = CACHE / f"sft-store-{n}"
            subprocess.run(
                [
                    *LLM,
                    "prepare",
                    "--kind",
                    "sft",
                    "--data",
                    str(src),
                    "--tokenizer",
                    str(tokenizer()),
                    "--out",
                    str(store),
                    "--workers",
                    "2",
                    "--quiet",
                ],
                check=True,
                cwd=ROOT,
            )
            run = Path(tmp) / f"run-{n}"
            cmd = [
                *LLM,
                "sft",
                "--init",
                str(init),
                "--data",
                str(store),
                "--out",
                str(run),
                "--seq-len",
                "256",
                "--max-steps",
                "3",
                "--eval-every",
                "0",
                "--save-every",
                "100",
                "--no-progress",
            ]
            rows.append((n, src.stat().st_size, "store", watch(cmd, run / "metrics.jsonl")))
        n = ns.sizes[0]
        r = watch([sys.executable, "-c", IN_MEMORY, str(conversations(n)), str(tokenizer())], None)
        rows.append((n, conversations(n).stat().st_size, "in memory (records read, examples built)", r))
    date = dt.date.today().isoformat()
    lines = [
        f"# SFT start-up by the number of conversations ({date})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"`python -m benchmarks.sft_store_memory --sizes {' '.join(map(str, ns.sizes))}`; micro model, "
        "--seq-len 256. Peak: resident memory of the process. The in-memory row only reads and builds the examples "
        "(what the stage did before training), so its time is a floor.",
        "",
        "| conversations | jsonl | data path | peak memory (MB) | first step (s) | process (s) |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for n, size, how, r in rows:
        first = f"{r['first_s']:.1f}" if r["first_s"] is not None else "-"
        lines.append(f"| {n:,} | {size / 1e6:.0f} MB | {how} | {r['peak_mb']:.0f} | {first} | {r['total_s']:.1f} |")
    return write_table(lines, f"{date}-cpu-sft-store-memory.md")


if __name__ == "__main__":
    main()
