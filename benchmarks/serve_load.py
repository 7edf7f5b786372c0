"""Throughput and latency of `llm-scratch serve` under concurrent streams (continuous batching).

    python -m benchmarks.serve_load                 # tiny preset, 1/4/16/64 streams, 64 tokens each

A `tiny` dense model (random weights: speed does not depend on what it learned) is served in this
process by uvicorn; the official `openai` client opens N streaming chat requests at once, each
generating exactly `--max-tokens` tokens (`ignore_eos`). Per level: aggregate completion tokens/s over
the wall time, time to first token, and request latency (p50/p99). Writes a dated table to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from benchmarks.report import write_table

BIN = Path(sys.executable).parent


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _model_dir(work: Path, preset: str) -> Path:
    from models import DenseLM, make_config, save_model
    from train.data.synthetic import generate
    from train.data.tokenizer import load_tokenizer, train_tokenizer

    data = generate(work / "data", pretrain_docs=300, sft=4, dpo=4)
    train_tokenizer([data["pretrain_train"]], 1024, work / "tok", quiet=True)
    torch.manual_seed(0)
    model = DenseLM(make_config("dense", preset, vocab_size=len(load_tokenizer(work / "tok"))))
    return save_model(model, work / "model", work / "tok")


async def _level(client, n: int, max_tokens: int) -> dict:
    async def one(i: int):
        start = time.perf_counter()
        first, tokens = None, 0
        stream = await client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": f"Tell me story number {i}."}],
            max_tokens=max_tokens,
            temperature=1.0,  # sampled (a random model's greedy text can be all special tokens, never a chunk)
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for c in chunk.choices:
                if first is None and (c.delta.content or getattr(c.delta, "reasoning_content", None)):
                    first = time.perf_counter() - start
        return first if first is not None else float("nan"), time.perf_counter() - start, tokens

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    latency = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    return {
        "streams": n,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50": _percentile(ttft, 0.5),
        "ttft_p99": _percentile(ttft, 0.99),
        "latency_p50": _percentile(latency, 0.5),
        "latency_p99": _percentile(latency, 0.99),
    }


def run(levels=(1, 4, 16, 64), max_tokens: int = 64, preset: str = "tiny", out_dir: Path | None = None) -> Path:
    import httpx
    import openai

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_dir = _model_dir(work, preset)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "llm-scratch"), "serve", "--checkpoint", str(model_dir), "--port", str(port)]
    cmd += ["--slots", str(max(levels)), "--model-name", "bench"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                health = httpx.get(url + "/health").json()
                break
            except httpx.TransportError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the server did not start: {server.stderr.read()[-2000:]}") from None
                time.sleep(0.2)

        async def main():
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
            await _level(client, 1, 4)  # warm-up
            rows = []
            for n in sorted(levels):
                row = await _level(client, n, max_tokens)
                row["peak_batch"] = httpx.get(url + "/health").json()["peak_batch"]  # levels ascend: this level's
                rows.append(row)
            await client.close()
            return rows

        rows = asyncio.run(main())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert health["status"] == "ok"

    from models import load_config
    from models.checkpoint import CONFIG_FILE

    config = load_config(model_dir / CONFIG_FILE)
    n_params = sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())
    date = dt.date.today().isoformat()
    base = rows[0]["tokens_per_s"]
    lines = [
        f"# Serving: concurrent streams, continuous batching ({date}, cpu)",
        "",
        f"Device: {platform.processor() or platform.machine()}; {os.cpu_count()} CPU cores; "
        f"torch {torch.__version__}. Model: `{preset}` dense preset ({n_params / 1e6:.1f}M parameters, "
        f"context {config.max_position_embeddings}), fp32, served by `llm-scratch serve --slots {max(levels)}` "
        "in a process of its own; the official `openai` client (another process) streams every request; "
        f"each samples {max_tokens} tokens (temperature 1, `ignore_eos`); time to first token is to the first "
        "chunk that carries text. Produced by `python -m benchmarks.serve_load`.",
        "",
        "| streams | tokens/s (all streams) | vs 1 stream | peak batch | TTFT p50 (s) | TTFT p99 (s) "
        "| latency p50 (s) | latency p99 (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['streams']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.1f}x | {r['peak_batch']} "
            f"| {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['latency_p50']:.2f} | {r['latency_p99']:.2f} |"
        )
    lines += [
        "",
        "Requests that arrive while others decode join the running batch at its next step (each one's prompt "
        "is prefilled alone first), so time to first token grows with the number of prompts waiting to be "
        "prefilled; every decode step then serves every active stream at once.",
    ]
    return write_table(lines, f"{date}-cpu-serve-load.md", out_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--preset", default="tiny")
    ns = ap.parse_args()
    run(tuple(ns.streams), ns.max_tokens, ns.preset)


if __name__ == "__main__":
    main()
