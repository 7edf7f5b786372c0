"""Large synthetic corpora for the data benchmarks, written once under .cache/bench-data/ (nothing downloaded).

The documents are the embedded pretraining generator's stories and facts (train/data/synthetic.py): a pool of
them is generated, then written in seeded shuffled order until the file reaches its size, so a 2 GB corpus
costs seconds to write, not the generator's time. The tokenizer is trained on the pool.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench-data"


def _pool(n: int = 50_000, seed: int = 0) -> list[str]:
    from train.data.synthetic import pretrain_text

    rng = random.Random(seed)
    return [pretrain_text(rng) for _ in range(n)]


def corpus(mb: int) -> Path:
    """A jsonl corpus of about `mb` MB ({"text": ...} per line)."""
    path = CACHE / f"corpus-{mb}mb.jsonl"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": t}) + "\n" for t in _pool()]
    rng, target, size = random.Random(mb), mb * 1_000_000, 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        while size < target:
            rng.shuffle(lines)
            for line in lines:
                f.write(line)
                size += len(line)
                if size >= target:
                    break
    tmp.replace(path)
    return path


def tokenizer(vocab: int = 4096) -> Path:
    out = CACHE / f"tokenizer-{vocab}"
    if (out / "tokenizer.json").exists():
        return out
    from train.data.tokenizer import train_tokenizer

    sample = CACHE / "pool.jsonl"
    CACHE.mkdir(parents=True, exist_ok=True)
    sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in _pool()))
    train_tokenizer([sample], vocab, out, quiet=True)
    return out


def conversations(n: int, pool: int = 20_000) -> Path:
    """A jsonl of n SFT conversations (the embedded generator's pool, repeated in seeded shuffled order)."""
    path = CACHE / f"sft-{n}.jsonl"
    if path.exists():
        return path
    from train.data.synthetic import sft_example

    rng = random.Random(1)
    lines = [json.dumps(sft_example(rng)[1]) + "\n" for _ in range(min(n, pool))]
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        left = n
        while left > 0:
            rng.shuffle(lines)
            f.writelines(lines[:left])
            left -= min(left, len(lines))
    tmp.replace(path)
    return path
