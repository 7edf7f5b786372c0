"""`llm-scratch verify`: every model through every stage for a few steps on freshly generated tiny
data, checking that each stage's loss is finite and falls. It runs in CI.

Models: dense and MoE (pretrain, SFT, DPO, GRPO), and the VLM built on the dense model (alignment with the
language model frozen, SFT on image questions, DPO on image answer pairs).
"Falls": the mean of the last three logged training losses is below the first one. GRPO's loss is no
measure of learning; its check is that the sampled reward rises (the mean of the last three steps above
that of the first three) under a reward every model's samples differ in: the share of letters "e".
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
RESULTS_FILE = "verify.json"  # one row per stage run: model, stage, measure (loss or reward), first, last
STEPS = 15


def letter_reward(completion: str, answer: str, finished: bool) -> float:
    """verify's GRPO reward (train/rewards.py's signature): the share of the letter "e" in the completion."""
    return completion.count("e") / max(len(completion), 1)


def _check_reward(model: str, run_dir: Path) -> tuple[float, float]:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "reward" in r]
    if len(rows) < 6 or not all(math.isfinite(r["loss"]) and math.isfinite(r["reward"]) for r in rows):
        raise UserError(f"verify: {model} grpo: losses or rewards are not all finite")
    first, last = (sum(r["reward"] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    if not last > first:
        raise UserError(f"verify: {model} grpo: the reward did not rise ({first:.4f} -> {last:.4f})")
    return first, last


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
        grpo = [
            "--init",
            str(base / "dpo"),
            "--data",
            str(data["rl_train"]),
            "--out",
            str(base / "grpo"),
            "--group-size",
            "4",
            "--prompts-per-step",
            "8",
            "--batch-size",
            "32",
            "--max-new-tokens",
            "24",
            "--lr",
            "3e-3",
            "--reward",
            "train.verify:letter_reward",
        ]
        run_stage("grpo", grpo + common)
        first, last = _check_reward(model, base / "grpo")
        results.append((model, "grpo", first, last))
        print(f"verify: {model:6s} grpo     reward {first:.4f} -> {last:.4f}  ok", flush=True)
    results += _verify_vlm(root, data, common)
    print(
        f"verify: all {len(results)} stage runs finite, losses falling and rewards rising, in "
        f"{time.perf_counter() - t0:.0f} s ({root})"
    )
    rows = [
        {"model": m, "stage": s, "measure": "reward" if s == "grpo" else "loss", "first": a, "last": b}
        for m, s, a, b in results
    ]
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
