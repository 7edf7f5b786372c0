"""Tokenizing a corpus: `llm-scratch prepare` with 1 and 2 workers, beside the old in-memory path and beside
`datasets.map(batched=True, num_proc=2)`, on the same jsonl corpus and tokenizer (CPU).

    python -m benchmarks.prepare_throughput [--mb 300]

Each way runs in a fresh process; the table gives its wall time, MB/s of corpus, tokens/s, and the peak
resident memory of its whole process tree (sampled every 0.1 s with psutil). The old path is what pretraining
did before the store: read every document into a list, tokenize them all with the transformers tokenizer into
one in-memory stream. `datasets.map` is timed on its own (after `load_dataset("json")` has built its Arrow
cache, timed apart), with the transformers tokenizer, as its users call it. Writes a dated table to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from benchmarks.corpus import corpus, tokenizer
from benchmarks.report import write_table
from benchmarks.watch import watch

ROOT = Path(__file__).resolve().parents[1]

PREPARE = r"""
import json, sys, time
from train.data.prepare import prepare
corpus, tok, out, workers = sys.argv[1:5]
t = time.perf_counter()
m = prepare([corpus], tok, out, workers=int(workers), quiet=True)
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": m["tokens"]}))
"""

IN_MEMORY = r"""
import json, sys, time
from train.data.formats import iter_pretrain_texts
from train.data.packing import tokenize_documents
from train.data.tokenizer import load_tokenizer
corpus, tok = sys.argv[1:3]
tokenizer = load_tokenizer(tok)
t = time.perf_counter()
stream = tokenize_documents(list(iter_pretrain_texts(corpus)), tokenizer, 0)
print(json.dumps({"seconds": time.perf_counter() - t, "tokens": int(len(stream))}))
"""

DATASETS_MAP = r"""
import json, sys, time
import datasets
from transformers import AutoTokenizer
corpus, tok, cache = sys.argv[1:4]
datasets.disable_progress_bars()
tokenizer = AutoTokenizer.from_pretrained(tok)
t = time.perf_counter()
ds = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
loaded = time.perf_counter() - t
t = time.perf_counter()
out = ds.map(lambda b: tokenizer(b["text"], add_special_tokens=False), batched=True, num_proc=2,
             remove_columns=["text"])
mapped = time.perf_counter() - t
tokens = sum(len(x) + 1 for x in out["input_ids"])  # + one end-of-text per document, as the store counts
print(json.dumps({"seconds": mapped, "load_seconds": loaded, "tokens": tokens}))
"""


def run_measured(code: str, *args: str) -> dict:
    """Run a child, sample the resident memory of its process tree, return its JSON line + peak_mb."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    r = watch([sys.executable, "-c", code, *args], tree=True, env=env, every=0.1)
    return {**json.loads(r["stdout"].strip().splitlines()[-1]), "peak_mb": r["peak_mb"]}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--skip-in-memory", action="store_true", help="leave out the old path (its memory is ~50x)")
    ns = ap.parse_args(argv)
    src, tok = corpus(ns.mb), tokenizer()
    size = src.stat().st_size
    rows = {}
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        for workers in (1, 2):
            rows[f"prepare, {workers} worker{'s' * (workers > 1)}"] = run_measured(
                PREPARE, str(src), str(tok), f"{tmp}/store{workers}", str(workers)
            )
        rows["datasets.map(batched=True, num_proc=2)"] = run_measured(DATASETS_MAP, str(src), str(tok), f"{tmp}/hf")
        if not ns.skip_in_memory:
            rows["old in-memory path (1 process)"] = run_measured(IN_MEMORY, str(src), str(tok))
    one = rows["prepare, 1 worker"]["seconds"]
    hf = rows["datasets.map(batched=True, num_proc=2)"]
    date = dt.date.today().isoformat()
    lines = [
        f"# Tokenizing a {size / 1e6:.0f} MB jsonl corpus ({date})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"`python -m benchmarks.prepare_throughput --mb {ns.mb}`. Tokenizer: byte-level BPE, 4096 tokens "
        "(benchmarks/corpus.py). Peak memory: the whole process tree, sampled every 0.1 s.",
        "",
        "| way | seconds | MB/s | M tokens/s | speed-up vs 1 worker | peak memory (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {size / 1e6 / r['seconds']:.2f} | {r['tokens'] / r['seconds'] / 1e6:.2f} "
            f"| {one / r['seconds']:.2f}x | {r['peak_mb']:.0f} |"
        )
    lines += [
        "",
        f'`datasets`: `load_dataset("json")` took a further {hf["load_seconds"]:.1f} s before `map` (not in its '
        "row). Tokens agree across the ways: " + ", ".join(f"{r['tokens']:,}" for r in rows.values()) + ".",
    ]
    return write_table(lines, f"{date}-cpu-prepare-throughput.md")


if __name__ == "__main__":
    main()
