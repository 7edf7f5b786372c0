"""Synthetic images for the VLM, with exact answers: coloured shapes on plain or noisy backgrounds.

Each image shows either one shape (a circle, square or triangle in one of six colours, in one of five
places) or 2-4 copies of one small shape (for counting). Per image:
- a caption (the alignment stage): "A red circle at the top left." / "Three blue squares.";
- question-answer conversations (SFT) about its colour, shape, position or count, reasoning in
  <think> (the caption) then a one-word answer; about one in five with thinking off;
- DPO pairs: the correct answer against a wrong one of the same kind.
Records use the ecosystem's VLM format: {"messages": [...], "images": ["images/train_00001.png"]} with
the image paths relative to the jsonl file, and one "<|image|>" placeholder in the user turn per image.
Train and held-out images come from separate seeds, so held-out images are new (every attribute
combination appears in both).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from models.chat_format import IMAGE, assistant_text

COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 40),
    "purple": (135, 60, 180),
    "orange": (240, 135, 30),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
NUMBER_WORDS = {1: "One", 2: "Two", 3: "Three", 4: "Four"}
QUESTIONS = {
    "color": ("What color is the shape?", "What color are the shapes?"),
    "shape": ("What shape is it?", "What shape are they?"),
    "position": ("Where is the shape?",),
    "count": ("How many shapes are there?",),
}


def _draw(draw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def render(spec: dict, size: int, rng: random.Random):
    """A PIL image for {'shape', 'color', 'position' or None, 'count', 'noisy'}."""
    from PIL import Image, ImageDraw

    if spec["noisy"]:
        noise = np.random.default_rng(rng.randrange(1 << 30)).integers(150, 256, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(noise, "RGB")
    else:
        shade = rng.randint(225, 255)
        img = Image.new("RGB", (size, size), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    fill = COLORS[spec["color"]]
    if spec["count"] == 1:
        fx, fy = POSITIONS[spec["position"]]
        r = size * rng.uniform(0.14, 0.2)
        jitter = size * 0.04
        _draw(
            draw,
            spec["shape"],
            fx * size + rng.uniform(-jitter, jitter),
            fy * size + rng.uniform(-jitter, jitter),
            r,
            fill,
        )
    else:  # small copies in distinct cells of a 3 x 3 grid
        cells = rng.sample(range(9), spec["count"])
        r = size * 0.14
        for c in cells:
            cx, cy = (c % 3 + 0.5) * size / 3, (c // 3 + 0.5) * size / 3
            _draw(draw, spec["shape"], cx + rng.uniform(-1, 1), cy + rng.uniform(-1, 1), r, fill)
    return img


def random_spec(rng: random.Random) -> dict:
    count = 1 if rng.random() < 0.6 else rng.randint(2, 4)
    return {
        "shape": rng.choice(SHAPES),
        "color": rng.choice(sorted(COLORS)),
        "count": count,
        "position": rng.choice(sorted(POSITIONS)) if count == 1 else None,
        "noisy": rng.random() < 0.3,
    }


def caption(spec: dict) -> str:
    if spec["count"] == 1:
        where = "in the center" if spec["position"] == "center" else f"at the {spec['position']}"
        article = "An" if spec["color"][0] in "aeiou" else "A"
        return f"{article} {spec['color']} {spec['shape']} {where}."
    return f"{NUMBER_WORDS[spec['count']]} {spec['color']} {spec['shape']}s."


def answer(spec: dict, kind: str) -> str:
    return {"color": spec["color"], "shape": spec["shape"], "position": spec["position"], "count": str(spec["count"])}[
        kind
    ]


def kinds_for(spec: dict) -> list[str]:
    return ["color", "shape", "position", "count"] if spec["count"] == 1 else ["color", "shape", "count"]


def question(spec: dict, kind: str) -> str:
    options = QUESTIONS[kind]
    return options[0] if spec["count"] == 1 or len(options) == 1 else options[1]


def wrong_answer(spec: dict, kind: str, rng: random.Random) -> str:
    pool = {
        "color": sorted(COLORS),
        "shape": list(SHAPES),
        "position": sorted(POSITIONS),
        "count": ["1", "2", "3", "4"],
    }[kind]
    return rng.choice([x for x in pool if x != answer(spec, kind)])


def generate_images(
    out_dir: str | Path, seed: int = 0, train: int = 2000, held_out: int = 200, size: int = 32
) -> dict[str, Path]:
    """Write images/ and the jsonl files: vlm_caption_{train,eval}, vlm_sft_{train,eval} (QA with an
    'answer' and 'kind'), vlm_dpo_{train,eval}. Returns their paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, n, split_seed in (("train", train, seed), ("eval", held_out, seed + 1_000_003)):
        rng = random.Random(split_seed)
        captions, sft, dpo = [], [], []
        for i in range(n):
            spec = random_spec(rng)
            rel = f"images/{split}_{i:05d}.png"
            render(spec, size, rng).save(out / rel)
            cap = caption(spec)
            captions.append(
                {
                    "messages": [
                        {"role": "user", "content": f"{IMAGE}\nDescribe the image."},
                        {"role": "assistant", "content": assistant_text("", cap, False)},
                    ],
                    "images": [rel],
                }
            )
            kinds = kinds_for(spec) if split == "eval" else [rng.choice(kinds_for(spec))]
            for kind in kinds:
                q, a = question(spec, kind), answer(spec, kind)
                think = split == "eval" or rng.random() >= 0.2
                sft.append(
                    {
                        "messages": [
                            {"role": "user", "content": f"{IMAGE}\n{q}"},
                            {"role": "assistant", "content": assistant_text(cap, a, think)},
                        ],
                        "images": [rel],
                        "answer": a,
                        "kind": kind,
                    }
                )
            kind = rng.choice(kinds_for(spec))
            q, a = question(spec, kind), answer(spec, kind)
            dpo.append(
                {
                    "prompt": [{"role": "user", "content": f"{IMAGE}\n{q}"}],
                    "images": [rel],
                    "chosen": assistant_text(cap, a, True),
                    "rejected": assistant_text(cap, wrong_answer(spec, kind, rng), True),
                    "answer": a,
                    "kind": kind,
                }
            )
        for name, records in (("vlm_caption", captions), ("vlm_sft", sft), ("vlm_dpo", dpo)):
            p = out / f"{name}_{split}.jsonl"
            p.write_text("".join(json.dumps(r) + "\n" for r in records))
            paths[f"{name}_{split}"] = p
    return paths
