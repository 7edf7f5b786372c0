"""End-to-end training throughput: tokens/s, MFU and peak memory of whole training steps (forward, backward,
AdamW step) for dense `small` and `base` and MoE `small` at seq 2048 in bf16, ours (eager and compiled; our
kernels and the torch references) beside transformers' Qwen2ForCausalLM with SDPA and with Liger-Kernel's
patch, same config, batch and data.

    python -m benchmarks.train_e2e                 # on the GPU (part of benchmarks/gpu_suite.sh)
    python -m benchmarks.train_e2e --smoke         # anywhere, `micro` configs and a few steps: checks the script

MFU = model FLOPs per step (models/flops.py, forward + backward, attention over the full row) / step time /
the device's peak bf16 rate (models/flops.py's table). Each provider gets a fresh model, `--warmup` untimed
steps (compilation happens there), then `--steps` timed ones. Writes benchmarks/results/DATE-DEVICE-train-e2e.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import time
from pathlib import Path

import torch

import kernels
from benchmarks.kernels import results_path
from benchmarks.report import RESULTS, write_table
from models import DenseLM, MoELM, make_config
from models.flops import peak_flops, training_flops

CASES = [("dense", "small"), ("dense", "base"), ("moe", "small")]


def _ours(kind: str, preset: str, seq: int, backend: str, compiled: bool):
    def build(device):
        cfg = make_config(kind, preset, max_position_embeddings=max(seq, 64))
        model = (DenseLM if kind == "dense" else MoELM)(cfg).to(device)
        if compiled:
            model.compile_layers()

        def loss(ids):
            with kernels.use_backend(backend):
                return model(ids, targets=torch.roll(ids, -1, 1)).loss

        return model, loss, cfg

    return build


def _transformers(preset: str, seq: int, liger: bool):
    def build(device):
        from transformers import Qwen2ForCausalLM

        from models.convert.qwen2 import hf_config

        cfg = make_config("dense", preset, max_position_embeddings=max(seq, 64))
        hf = hf_config(cfg, {})
        hf._attn_implementation = "sdpa"
        if liger:
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2

            apply_liger_kernel_to_qwen2()
        model = Qwen2ForCausalLM(hf).to(device)

        def loss(ids):
            return model(input_ids=ids, labels=ids).loss

        return model, loss, cfg

    return build


def providers(kind: str, preset: str, seq: int, device: str, smoke: bool) -> dict:
    """The ways to train one config, the comparison that matters first (a time limit keeps what ran)."""
    out = {"ours, eager, our kernels": _ours(kind, preset, seq, "triton", False)}
    if kind == "dense":
        out["transformers + SDPA"] = _transformers(preset, seq, liger=False)
    out["ours, eager, torch reference"] = _ours(kind, preset, seq, "torch", False)
    if not smoke:
        out["ours, compiled, our kernels"] = _ours(kind, preset, seq, "triton", True)
    if kind == "dense" and device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
        out["transformers + Liger-Kernel"] = _transformers(preset, seq, liger=True)
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(build, device: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    torch.manual_seed(0)
    model, loss_fn, cfg = build(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = loss_fn(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    flops = training_flops(cfg, batch, seq)
    result = {"step_s": seconds, "tokens_s": batch * seq / seconds, "tflops": flops / seconds / 1e12}
    result.update(peak_gib=peak, loss=float(loss.detach()))
    return result


def run(smoke: bool, out_dir: Path = RESULTS, batch: int = 8, seq: int = 2048, warmup: int = 3, steps: int = 10):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if smoke:
        presets, batch, seq, warmup, steps = {"small": "micro", "base": "micro"}, 2, 32, 1, 2
    elif device != "cuda":
        raise SystemExit("the end-to-end benchmark needs a GPU; use --smoke to check the script on CPU")
    else:
        presets = {"small": "small", "base": "base"}
    path, name, date = results_path(out_dir, device, "train-e2e", smoke)
    peak = peak_flops(name) if device == "cuda" else None
    lines = [
        f"# End-to-end training steps on {name} ({date})",
        "",
        f"`python -m benchmarks.train_e2e{' --smoke' if smoke else ''}`: batch {batch} x seq {seq}, "
        f"{'bf16 autocast' if device == 'cuda' else 'fp32'}, forward + backward + AdamW, {warmup} warm-up "
        f"then {steps} timed steps; MFU against {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'no known peak'}. "
        "Goals: dense `base` >= 45% MFU and >= 1.2x transformers + SDPA tokens/s; MoE `small` >= 30% MFU.",
        "",
        "| model | preset | way | tokens/s | vs transformers + SDPA | TFLOP/s | MFU | peak GiB | loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    results = {}  # (kind, preset) -> [(way, result or None)]
    # Liger-Kernel patches transformers' Qwen2 classes for the whole process: its rows run last
    for liger_pass in (False, True):
        for kind, preset in CASES:
            real = presets[preset]
            for way, build in providers(kind, real, seq, device, smoke).items():
                if ("Liger" in way) != liger_pass:
                    continue
                try:
                    r = measure(build, device, batch, seq, warmup, steps)
                    print(f"{kind} {real} {way}: {r['tokens_s']:.0f} tokens/s, {r['tflops']:.1f} TFLOP/s", flush=True)
                except Exception as e:  # noqa: BLE001 - one provider failing must not cost the others' rows
                    print(f"{kind} {real} {way}: failed: {type(e).__name__}: {e}", flush=True)
                    r = None
                results.setdefault((kind, real), []).append((way, r))
                gc.collect()  # the provider's model and optimizer are gone before the next one is built
                if device == "cuda":
                    torch.cuda.empty_cache()
                # after every row: a time limit keeps what ran
                write_table(lines + _rows(results, peak), path.name, path.parent, echo=False)
    return write_table(lines + _rows(results, peak), path.name, path.parent)


def _rows(results: dict, peak: float | None) -> list[str]:
    lines = []
    for (kind, real), rows in results.items():
        base_tps = next((r["tokens_s"] for way, r in rows if way == "transformers + SDPA" and r), None)
        for way, r in rows:
            if r is None:
                lines.append(f"| {kind} | {real} | {way} | failed | | | | | |")
                continue
            vs = f"{r['tokens_s'] / base_tps:.2f}x" if base_tps else "-"
            mfu = f"{100 * r['tflops'] * 1e12 / peak:.1f}%" if peak else "-"
            lines.append(
                f"| {kind} | {real} | {way} | {r['tokens_s']:,.0f} | {vs} | {r['tflops']:.2f} | {mfu} "
                f"| {r['peak_gib']:.1f} | {r['loss']:.3f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="micro configs, any device: checks that the script runs")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    ns = p.parse_args(argv)
    run(ns.smoke, Path(ns.out), ns.batch, ns.seq, ns.warmup, ns.steps)


if __name__ == "__main__":
    main()
