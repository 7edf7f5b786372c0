"""The demo's VLM part: after the text models, a small VLM learns to answer questions about synthetic
images through the same stages: alignment (vision tower and projector, language model frozen), SFT
on image questions, DPO on image answer pairs. Held-out exact match by question kind after each stage,
then GRPO on image questions (when the plan gives it steps), a chat about an image and a logits check
against transformers' LLaVA."""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch

from models.chat_format import IMAGE

from .data.synthetic_images import generate_images

KINDS = ("color", "shape", "position", "count")


def _vlm_accuracy(run_dir: Path, tok, records) -> dict[str, float]:
    from models import load_pretrained

    from .evaluate import exact_match

    res = exact_match(load_pretrained(run_dir).eval(), tok, records, think=True, max_new_tokens=40)
    return {k.removeprefix("image "): c / n for k, (c, n) in res["by_category"].items()}


def run_vlm_demo(out: Path, dense_dir: Path, tok, cfg: dict, stage, say, grpo_argv, seed: int = 0) -> dict:
    """`stage(argv)` runs a CLI stage; `say(text)` prints a numbered step heading; `grpo_argv(init, data, out,
    cfg, steps, max_new_tokens)` is the demo's GRPO command line."""
    from models import export_hf, load_pretrained

    from .evaluate import load_eval_records
    from .vlm_init import init_vlm

    t0 = time.perf_counter()
    say(
        f"VLM: {cfg['vlm_images']} synthetic images, a ViT encoder + projector in front of the dense model; "
        "alignment, SFT, DPO" + (", GRPO" if cfg["vlm_grpo_steps"] else "")
    )
    paths = generate_images(
        out / "data", seed=seed, train=cfg["vlm_images"], held_out=cfg["vlm_eval_images"], size=cfg["vlm_image_size"]
    )
    records = load_eval_records(paths["vlm_sft_eval"])
    init_vlm(
        str(dense_dir), str(out / "vlm_init"), preset=cfg["vlm_preset"], seed=seed, image_size=cfg["vlm_image_size"]
    )
    acc = {"init": _vlm_accuracy(out / "vlm_init", tok, records)}
    common = ["--seq-len", "128", "--batch-size", "32", "--no-progress", "--eval-batches", "4"]
    runs = [
        (
            "align",
            [
                "sft",
                "--init",
                str(out / "vlm_init"),
                "--data",
                str(paths["vlm_caption_train"]),
                "--eval-data",
                str(paths["vlm_caption_eval"]),
                "--train",
                "projector,vision",
                "--lr",
                "3e-3",
            ],
            cfg["vlm_align_steps"],
        ),
        (
            "sft",
            [
                "sft",
                "--init",
                str(out / "vlm_align"),
                "--data",
                str(paths["vlm_sft_train"]),
                "--eval-data",
                str(paths["vlm_sft_eval"]),
                "--lr",
                "3e-3",
                "--min-lr-ratio",
                "0",
            ],
            cfg["vlm_sft_steps"],
        ),
        (
            "dpo",
            [
                "dpo",
                "--init",
                str(out / "vlm_sft"),
                "--data",
                str(paths["vlm_dpo_train"]),
                "--eval-data",
                str(paths["vlm_dpo_eval"]),
                "--lr",
                "1e-4",
                "--sft-weight",
                str(cfg["dpo_sft_weight"]),
            ],
            cfg["vlm_dpo_steps"],
        ),
    ]
    summaries = {}
    for name, argv, steps in runs:
        summaries[name] = stage(
            argv
            + [
                "--out",
                str(out / f"vlm_{name}"),
                "--max-steps",
                str(steps),
                "--eval-every",
                str(steps),
                "--save-every",
                str(steps),
                "--warmup-steps",
                str(max(1, steps // 10)),
            ]
            + common
        )
        acc[name] = _vlm_accuracy(out / f"vlm_{name}", tok, records)
        s = summaries[name]
        print(
            f"  {name}: held-out loss {s['eval_before']['eval_loss']:.3f} -> {s['eval_after']['eval_loss']:.3f}; "
            + ", ".join(f"{k} {acc[name].get(k, 0):.0%}" for k in KINDS)
        )
    dpo = summaries["dpo"]
    print(
        f"  DPO held-out pairs: reward accuracy {dpo['eval_after']['eval_accuracy']:.1%}, margin "
        f"{dpo['eval_after']['eval_margin']:.2f}"
    )
    final = "vlm_dpo"
    if cfg["vlm_grpo_steps"]:
        argv = grpo_argv(out / "vlm_dpo", paths["vlm_sft_train"], out / "vlm_grpo", cfg, cfg["vlm_grpo_steps"], 40)
        stage(argv + ["--no-progress"])
        final = "vlm_grpo"
        acc["grpo"] = _vlm_accuracy(out / final, tok, records)
        print("  grpo: " + ", ".join(f"{k} {acc['grpo'].get(k, 0):.0%}" for k in KINDS))

    from .chat import ChatSession, Display

    sample = next(r for r in records if r.category == "image color")
    image = sample.images[0]
    session = ChatSession(out / final, think=True, image=str(image), temperature=0.0, max_new_tokens=40)
    question = sample.prompt[-1]["content"].replace(f"{IMAGE}\n", "")
    buf = io.StringIO()
    session.reply(question, Display(buf))
    print(f"  > [{image.name}] {question}   (the image's answer: {sample.answer})")
    print("    " + buf.getvalue().rstrip().replace("\n", "\n    "))

    from transformers import AutoModelForImageTextToText

    hf_dir = export_hf(out / final, out / "vlm_hf")
    hf = AutoModelForImageTextToText.from_pretrained(str(hf_dir), attn_implementation="eager").eval()
    ours = load_pretrained(out / final).eval()
    c = ours.config
    ids = torch.tensor([[1] + [c.image_token_id] * c.image_tokens + [2, 3]])
    pixels = torch.randn(1, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids, pixel_values=pixels).logits - hf(input_ids=ids, pixel_values=pixels).logits).abs().max()
    print(f"  exported as transformers {type(hf).__name__}: max |logit difference| {float(diff):.1e}")
    return {
        "accuracy": acc,
        "dpo": dpo,
        "seconds": time.perf_counter() - t0,
        "hf_max_diff": float(diff),
        "questions": len(records),
        "final": final,
    }


def print_vlm_table(res: dict) -> None:
    print(f"\nVLM held-out results ({res['questions']} questions about new images, greedy, thinking on)")
    print("  " + f"{'stage':8s}" + "".join(f"{k:>10s}" for k in KINDS))
    for name, label in (("init", "start"), ("align", "align"), ("sft", "SFT"), ("dpo", "DPO"), ("grpo", "GRPO")):
        if name not in res["accuracy"]:
            continue
        a = res["accuracy"][name]
        print("  " + f"{label:8s}" + "".join(f"{a.get(k, 0.0):10.1%}" for k in KINDS))
