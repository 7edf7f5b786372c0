"""Step time and throughput of DeepSpeed ZeRO runs against one process with the same global batch.

    python -m benchmarks.deepspeed_steps            # CPU: 1 process vs 2 CPU ranks under ZeRO-2
    python -m benchmarks.deepspeed_steps --gpus 8   # GPU: tokens/s per GPU for ZeRO-1/2/3

Each run trains the `tiny` dense preset on the synthetic data through the real entry points
(`python -m train.pretrain` and the `deepspeed` launcher) and reads the per-step times from
metrics.jsonl (median over the steps after the first two). Writes a dated table to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(cmd: list[str], env: dict) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if r.returncode:
        sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{(r.stdout + r.stderr)[-3000:]}")


def _step_stats(out: Path) -> tuple[float, float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r][2:]
    secs = statistics.median(r["tokens"] / r["tokens_per_s"] for r in steps)
    return secs, statistics.median(r["tokens_per_s"] for r in steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=0, help="GPUs to use (0: CPU ranks)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ns = ap.parse_args()
    on_gpu = ns.gpus > 0
    ranks = ns.gpus if on_gpu else 2
    stages = ["zero1.json", "zero2.json", "zero3.json"] if on_gpu else ["zero2.json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not on_gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

    from train.data.synthetic import generate
    from train.data.tokenizer import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="ds-bench-"))
    data = generate(work / "data", pretrain_docs=6000, sft=10, dpo=10)
    train_tokenizer([data["pretrain_train"]], 4096, work / "tok", quiet=True)
    common = [
        "--data",
        str(data["pretrain_train"]),
        "--tokenizer",
        str(work / "tok"),
        "--preset",
        "tiny",
        "--seq-len",
        str(ns.seq_len),
        "--max-steps",
        str(ns.steps),
        "--eval-every",
        "0",
        "--save-every",
        str(10 * ns.steps),
        "--no-progress",
    ]
    rows = []
    out = work / "single"
    _run(
        [sys.executable, "-m", "train.pretrain", *common, "--out", str(out), "--batch-size", str(ns.global_batch)], env
    )
    secs, tps = _step_stats(out)
    rows.append(("1 process (no DeepSpeed)", 1, secs, tps))
    for cfg in stages:
        out = work / cfg.replace(".json", "")
        _run(
            [
                str(BIN / "deepspeed"),
                "--num_gpus",
                str(ranks),
                "--master_port",
                _port(),
                "--module",
                "train.pretrain",
                *common,
                "--out",
                str(out),
                "--batch-size",
                str(ns.global_batch // ranks),
                "--deepspeed",
                str(ROOT / "ds_configs" / cfg),
            ],
            env,
        )
        secs, tps = _step_stats(out)
        rows.append((f"{ranks} ranks, {cfg}", ranks, secs, tps))

    device = torch.cuda.get_device_name(0) if on_gpu else (platform.processor() or platform.machine())
    date = dt.date.today().isoformat()
    kind = "gpu" if on_gpu else "cpu"
    tokens = ns.global_batch * ns.seq_len
    lines = [
        f"# DeepSpeed step time vs one process ({date}, {kind})",
        "",
        f"Device: {device}; {os.cpu_count()} CPU cores; torch {torch.__version__}. Model: `tiny` dense preset; "
        f"global batch {ns.global_batch} x {ns.seq_len} = {tokens} tokens per step; "
        f"median over steps 3-{ns.steps}. Produced by `python -m benchmarks.deepspeed_steps`.",
        "",
        "| run | ranks | step time (s) | tokens/s | tokens/s per rank | vs 1 process |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0][2]
    for name, n, secs, tps in rows:
        lines.append(f"| {name} | {n} | {secs:.3f} | {tps:,.0f} | {tps / n:,.0f} | {base / secs:.2f}x |")
    if not on_gpu:
        lines += [
            "",
            "Both runs share the machine's cores: 2 CPU ranks split the same cores that one process uses "
            "alone, so the difference is the cost of the data-parallel machinery (gradient reduction over "
            "gloo, ZeRO partitioning), not a speed-up to expect.",
        ]
    out_file = ROOT / "benchmarks" / "results" / f"{date}-{kind}-deepspeed-steps.md"
    out_file.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out_file}")


if __name__ == "__main__":
    main()
