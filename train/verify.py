"""`llm-scratch verify`: every model through every stage for a few steps on freshly generated tiny
data, checking that each stage's loss is finite and falls. It runs in CI.

Models: dense and MoE (pretrain, SFT, DPO), and the VLM built on the dense model (alignment with the
language model frozen, SFT on image questions, DPO on image answer pairs).
"Falls": the mean of the last three logged training losses is below the first one.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

from .engine.metrics import read_metrics
from .errors import UserError
from .stages import run_stage

MODELS = ("dense", "moe")
RESULTS_FILE = "verify.json"  # one row per stage run: model, stage, first and last loss
STEPS = 15


def _check(stage: str, model: str, run_dir: Path) -> tuple[float, float]:
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    if len(losses) < 4 or not all(math.isfinite(x) for x in losses):
        raise UserError(f"verify: {model} {stage}: losses are not all finite: {losses}")
    first, last = losses[0], sum(losses[-3:]) / 3
    if not last < first:
        raise UserError(f"verify: {model} {stage}: the loss did not fall ({first:.4f} -> {last:.4f})")
    return first, last


def run_verify(out: str | None = None) -> list[tuple[str, str, float, float]]:
    from .data.synthetic import generate
    from .data.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    root = Path(out) if out else Path(tempfile.mkdtemp(prefix="llm-scratch-verify-"))
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(f"--out {root}: verify needs a new or empty directory")
    data = generate(root / "data", seed=1, pretrain_docs=800, sft=200, dpo=100)
    train_tokenizer([data["pretrain_train"], data["sft_train"]], 1024, root / "tok", quiet=True)
    common = [
        "--max-steps",
        str(STEPS),
        "--eval-every",
        "0",
        "--no-progress",
        "--warmup-steps",
        "2",
        "--save-every",
        str(STEPS),
    ]
    results = []
    for model in MODELS:
        base = root / model
        stages = [
            (
                "pretrain",
                [
                    "--data",
                    str(data["pretrain_train"]),
                    "--tokenizer",
                    str(root / "tok"),
                    "--out",
                    str(base / "pretrain"),
                    "--model",
                    model,
                    "--preset",
                    "micro",
                    "--seq-len",
                    "64",
                    "--batch-size",
                    "8",
                    "--lr",
                    "1e-2",
                ],
            ),
            (
                "sft",
                [
                    "--init",
                    str(base / "pretrain"),
                    "--data",
                    str(data["sft_train"]),
                    "--out",
                    str(base / "sft"),
                    "--seq-len",
                    "256",
                    "--batch-size",
                    "8",
                    "--lr",
                    "5e-3",
                ],
            ),
            (
                "dpo",
                [
                    "--init",
                    str(base / "sft"),
                    "--data",
                    str(data["dpo_train"]),
                    "--out",
                    str(base / "dpo"),
                    "--seq-len",
                    "256",
                    "--batch-size",
                    "4",
                    "--lr",
                    "2e-3",
                ],
            ),
        ]
        for stage, args in stages:
            run_stage(stage, args + common)
            first, last = _check(stage, model, base / stage)
            results.append((model, stage, first, last))
            print(f"verify: {model:6s} {stage:8s} loss {first:.4f} -> {last:.4f}  ok", flush=True)
    results += _verify_vlm(root, data, common)
    print(f"verify: all {len(results)} stage runs finite and falling in {time.perf_counter() - t0:.0f} s ({root})")
    rows = [{"model": m, "stage": s, "first_loss": a, "last_loss": b} for m, s, a, b in results]
    (root / RESULTS_FILE).write_text(json.dumps(rows, indent=2) + "\n")
    return results


def _verify_vlm(root: Path, data: dict, common: list[str]) -> list[tuple[str, str, float, float]]:
    from .data.synthetic_images import generate_images
    from .vlm_init import init_vlm

    images = generate_images(root / "data", seed=1, train=96, held_out=8)
    base = root / "vlm"
    init_vlm(str(root / "dense" / "sft"), str(base / "init"), preset="micro")
    stages = [
        (
            "align",
            "sft",
            [
                "--init",
                str(base / "init"),
                "--data",
                str(images["vlm_caption_train"]),
                "--train",
                "projector,vision",
                "--lr",
                "1e-2",
            ],
        ),
        ("sft", "sft", ["--init", str(base / "align"), "--data", str(images["vlm_sft_train"]), "--lr", "5e-3"]),
        ("dpo", "dpo", ["--init", str(base / "sft"), "--data", str(images["vlm_dpo_train"]), "--lr", "2e-3"]),
    ]
    results = []
    for stage, name, args in stages:
        run_stage(name, args + ["--out", str(base / stage), "--seq-len", "96", "--batch-size", "8"] + common)
        first, last = _check(stage, "vlm", base / stage)
        results.append(("vlm", stage, first, last))
        print(f"verify: {'vlm':6s} {stage:8s} loss {first:.4f} -> {last:.4f}  ok", flush=True)
    return results
