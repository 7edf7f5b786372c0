"""Exact-match evaluation: generate answers to held-out questions and compare with the known answer.

    llm-scratch eval --checkpoint DIR --data sft_eval.jsonl [--no-think]

Records are SFT-style (`messages` whose last user turn is the question) with an `answer` field, as the
synthetic held-out splits have. The model answers greedily in think mode (or with thinking off); its
answer (the text after </think>) must equal `answer` exactly. Results are grouped by task: addition
and subtraction by the number of digits of the larger operand, and the other chat tasks.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from models.chat_format import PAD, STOP_TOKENS
from models.generate import generate
from models.think import split_reasoning

from .data.chat_masks import encode_prompt
from .data.formats import read_jsonl, sft_record
from .data.images import image_inputs
from .data.records import EvalRecord
from .errors import UserError

ARITH = re.compile(r"What is (-?\d+) ([+-]) (-?\d+)\?")


def category(question: str) -> str:
    m = ARITH.fullmatch(question.strip())
    if m:
        digits = max(len(m.group(1)), len(m.group(3)))
        return f"{'addition' if m.group(2) == '+' else 'subtraction'} {digits}-digit"
    if question.startswith("Spell"):
        return "spell backwards"
    if question.startswith("Which is larger"):
        return "compare numbers"
    if question.startswith("How many times"):
        return "count letters"
    return "other"


def load_eval_records(path, images_anywhere: bool = False) -> list[EvalRecord]:
    """Records with the prompt (the non-assistant turns), the answer, a category, and the images (VLM
    records: paths resolved against the file's directory; the category is 'image ' + the record's kind)."""
    out = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        if "answer" not in rec or "messages" not in rec:
            raise UserError(f"{where}: an evaluation record needs 'messages' and 'answer'")
        conv = sft_record(rec, path, where, need_assistant=False, images_anywhere=images_anywhere)
        prompt = [m for m in conv.messages if m["role"] != "assistant"]
        question = next(m["content"] for m in reversed(prompt) if m["role"] == "user")
        cat = f"image {rec['kind']}" if conv.images and "kind" in rec else category(question)
        out.append(EvalRecord(prompt, str(rec["answer"]), cat, conv.images, where))
    return out


@torch.no_grad()
def exact_match(
    model, tokenizer, records: list[EvalRecord], think: bool = True, batch_size: int = 64, max_new_tokens: int = 256
) -> dict:
    """{'overall': accuracy, 'by_category': {name: (correct, total)}, 'samples': [...]}"""
    stop = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    pad = tokenizer.convert_tokens_to_ids(PAD)
    image_tokens, loader = image_inputs(model)
    prompts = [encode_prompt(tokenizer, r.prompt, think, image_tokens) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        pixels = loader([p for i in idx for p in records[i].images]) if loader else None
        outs = generate(
            model, [prompts[i] for i in idx], max_new_tokens, stop_ids=stop, pad_id=pad, pixel_values=pixels
        )
        for i, new in zip(idx, outs):
            answers[i] = split_reasoning(tokenizer.decode(new, skip_special_tokens=True))[1].strip()
    by_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i, r in enumerate(records):
        ok = answers[i] == r.answer
        by_cat[r.category][0] += ok
        by_cat[r.category][1] += 1
    correct = sum(c for c, _ in by_cat.values())
    return {
        "overall": correct / max(1, len(records)),
        "correct": correct,
        "total": len(records),
        "by_category": {k: tuple(v) for k, v in sorted(by_cat.items())},
        "samples": [(records[i].answer, answers[i]) for i in range(min(5, len(records)))],
    }
