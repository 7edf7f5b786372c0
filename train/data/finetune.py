"""Rows for the fine-tuning stages: SFT conversations (one per row, or packed) and DPO pairs, tokenized
with their loss masks (train/data/chat_masks.py), padded per batch; a VLM's rows carry their images.

Truncation policy: a conversation longer than the row length keeps its beginning; one whose first
assistant token falls beyond the limit has nothing to learn from and is dropped, and the number
dropped is reported. A DPO pair keeps its prompt and cuts the completions' ends.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from models import IGNORE_INDEX
from models.chat_format import IM_END, IMAGE

from ..errors import UserError
from .batches import fingerprint
from .chat_masks import encode_with_mask, expand_image_tokens, render_conversation
from .records import Conversation, PreferencePair


@dataclass
class SFTExample:
    ids: np.ndarray  # int32 tokens
    trained: np.ndarray  # bool, per token: in the loss
    images: tuple = ()  # image paths, one per expanded <|image|> run, in order


def _check_images(images, image_tokens: int, where: str) -> None:
    if images and not image_tokens:
        raise UserError(f"{where}: the record has images but the model is not a VLM")


def _images_fit(ids, image_id: int, n_images: int, image_tokens: int) -> bool:
    return n_images == 0 or sum(1 for i in ids if i == image_id) == n_images * image_tokens


def encode_sft(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """A conversation rendered with the chat template: its ids and, per token, whether it is trained on."""
    return encode_with_mask(tokenizer, render_conversation(tokenizer, messages))


def sft_fits(mask, max_len: int) -> bool:
    """Some target within the first max_len + 1 tokens is trained on (else the row teaches nothing)."""
    return any(mask[1 : max_len + 1])


def build_sft_examples(
    tokenizer, conversations: list[Conversation], max_len: int, image_tokens: int = 0
) -> tuple[list[SFTExample], int]:
    """(examples, number dropped because no assistant token, or not every image token, fits in
    max_len + 1 tokens). With `image_tokens` (a VLM) each <|image|> expands to that many tokens."""
    out, dropped = [], 0
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    for conv in conversations:
        images = tuple(conv.images)
        _check_images(images, image_tokens, conv.where or "a conversation")
        ids, mask = encode_sft(tokenizer, conv.messages)
        if image_tokens:
            ids, mask = expand_image_tokens(ids, mask, image_id, image_tokens)
        ids, mask = ids[: max_len + 1], mask[: max_len + 1]
        if not sft_fits(mask, max_len) or not _images_fit(ids, image_id, len(images), image_tokens):
            dropped += 1
            continue
        out.append(SFTExample(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool), images))
    return out, dropped


def _row(ids: np.ndarray, trained: np.ndarray) -> dict[str, torch.Tensor]:
    """Inputs are ids[:-1]; the target at t is ids[t+1] when that token is trained on."""
    x = torch.from_numpy(ids[:-1].astype(np.int64))
    y = torch.from_numpy(ids[1:].astype(np.int64))
    y[~torch.from_numpy(trained[1:])] = IGNORE_INDEX
    return {"input_ids": x, "targets": y}


def _examples_fingerprint(examples, *extra) -> str:
    if hasattr(examples, "fingerprint"):  # examples read from a store: its content hash and the range
        return fingerprint(examples.fingerprint(), *extra)
    return fingerprint([[getattr(e, f.name) for f in dataclasses.fields(e)] for e in examples], *extra)


def trained_tokens(examples) -> int:
    """How many targets the examples train on."""
    if hasattr(examples, "trained_tokens"):
        return examples.trained_tokens()
    return int(sum(e.trained[1:].sum() for e in examples))


class SFTDataset:
    """One conversation per row (padded per batch by `pad_collate`). With an image loader (a VLM) every
    row carries its images as `pixel_values` [n, 3, H, W] (n may be 0)."""

    def __init__(self, examples: list[SFTExample], image_loader=None):
        self.examples = examples
        self.image_loader = image_loader

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        return _examples_fingerprint(self.examples, type(self).__name__)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = self.examples[i]
        row = _row(e.ids, e.trained)
        if self.image_loader is not None:
            row["pixel_values"] = self.image_loader(e.images)
        return row


def pack_next_fit(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows in corpus order: a new row whenever the next item does not fit. Same (order, starts) form as
    `pack_best_fit`."""
    starts, used = [], 0
    for k, n in enumerate(lengths):
        if not starts or used + n > capacity:
            starts.append(k)
            used = 0
        used += int(n)
    return np.arange(len(lengths), dtype=np.int64), np.asarray(starts + [len(lengths)], dtype=np.int64)


def pack_best_fit(lengths, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Plan rows of `capacity` tokens from item lengths: best-fit decreasing (the longest item first, each
    into the fullest row that still has room for it, else a new row). Returns (order, starts): row r holds
    items order[starts[r]:starts[r + 1]]. Deterministic (ties by index); O(n log n), two integers per item.

    On the demo's conversations in rows of 289 tokens it fills 84% of each row where next-fit fills 70%
    (docs/training.md)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"pack_best_fit: item lengths must be in [1, {capacity}]")
    by_length = np.argsort(-lengths, kind="stable")
    row_of = np.empty(len(lengths), dtype=np.int64)
    room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room[c]: rows with c tokens free
    has_room = 0  # bit c set while room[c] holds a row
    n_rows = 0
    for k in by_length.tolist():
        n = int(lengths[k])
        fits = has_room >> n
        if fits:  # the row with the least room that still fits n
            c = n + (fits & -fits).bit_length() - 1
            r = room[c].pop()
            if not room[c]:
                has_room &= ~(1 << c)
        else:
            r, c = n_rows, capacity
            n_rows += 1
        row_of[k] = r
        room[c - n].append(r)
        has_room |= 1 << (c - n)
    order = np.lexsort((-lengths, row_of))  # by row, the longest first within a row
    starts = np.searchsorted(row_of[order], np.arange(n_rows + 1))
    return order.astype(np.int64), starts.astype(np.int64)


PACKING = {"next-fit": pack_next_fit, "best-fit": pack_best_fit}  # sft --pack-strategy


class PackedSFTDataset:
    """Conversations packed into rows of seq_len + 1 tokens (`strategy`: a key of PACKING); segment ids
    keep them from attending to each other and positions restart for each. Padding fills the rest. The
    packing is planned from the lengths alone (a store gives them without reading the conversations)."""

    def __init__(self, examples, seq_len: int, pad_id: int, image_loader=None, strategy: str = "next-fit"):
        self.examples, self.image_loader = examples, image_loader
        lengths = examples.lengths() if hasattr(examples, "lengths") else [len(e.ids) for e in examples]
        self.order, self.starts = PACKING[strategy](lengths, seq_len + 1)
        self.seq_len, self.pad_id = seq_len, pad_id

    def __len__(self) -> int:
        return len(self.starts) - 1

    def fingerprint(self) -> str:
        return _examples_fingerprint(self.examples, self.order, self.starts, self.seq_len)

    def row_examples(self, i: int) -> list[SFTExample]:
        return [self.examples[int(k)] for k in self.order[self.starts[i] : self.starts[i + 1]]]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = self.seq_len + 1
        ids = np.full(n, self.pad_id, dtype=np.int32)
        trained = np.zeros(n, dtype=bool)
        examples = self.row_examples(i)
        seg = np.full(n, len(examples), dtype=np.int64)  # padding: a segment of its own
        pos = np.zeros(n, dtype=np.int64)
        at = 0
        for k, e in enumerate(examples):
            m = len(e.ids)
            ids[at : at + m], trained[at : at + m] = e.ids, e.trained
            # a conversation's first token is never the target of the previous conversation's last one
            trained[at] = False
            seg[at : at + m], pos[at : at + m] = k, np.arange(m)
            at += m
        pos[at:] = np.arange(n - at)
        row = _row(ids, trained)
        row["segment_ids"] = torch.from_numpy(seg[:-1])
        row["position_ids"] = torch.from_numpy(pos[:-1])
        if self.image_loader is not None:
            row["pixel_values"] = self.image_loader([p for e in examples for p in e.images])
        return row


def pad_collate(pad_id: int):
    """Right-pad a batch to its longest row: padded inputs are pad_id, padded targets are ignored.
    With right padding no real token ever sees a pad token (causal attention), so no mask is needed."""

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        out: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", pad_id), ("targets", IGNORE_INDEX), ("segment_ids", -1), ("position_ids", 0)):
            if key not in rows[0]:
                continue
            t = torch.full((len(rows), width), fill, dtype=torch.long)
            for i, r in enumerate(rows):
                t[i, : len(r[key])] = r[key]
            out[key] = t
        if "pixel_values" in rows[0]:  # images in row-major order, as the VLM fills its image tokens
            out["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
        return out

    return collate


# ---------------------------------------------------------------- DPO pairs


@dataclass
class DPOExample:
    prompt: np.ndarray  # int32 tokens of the rendered prompt, generation header included
    chosen: np.ndarray  # completion tokens, <|im_end|> included
    rejected: np.ndarray
    images: tuple = ()


def encode_dpo(tokenizer, pair: PreferencePair) -> tuple[list[int], list[int], list[int]]:
    """The prompt rendered with the generation prompt (thinking on: the completion carries its own <think>
    block), and each completion followed by <|im_end|>."""
    prompt = tokenizer.apply_chat_template(pair.prompt, add_generation_prompt=True, tokenize=False)
    p = tokenizer.encode(prompt, add_special_tokens=False)
    c = tokenizer.encode(pair.chosen + IM_END, add_special_tokens=False)
    r = tokenizer.encode(pair.rejected + IM_END, add_special_tokens=False)
    return p, c, r


def build_dpo_examples(
    tokenizer, pairs: list[PreferencePair], max_len: int, image_tokens: int = 0
) -> tuple[list[DPOExample], int]:
    """Prompt rendered with the generation prompt (thinking on: the completion carries its own
    <think> block), completions followed by <|im_end|>. Truncation keeps the prompt and cuts the
    completion's end; a pair whose prompt leaves no room for a completion token is dropped."""
    out, dropped = [], 0
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    for pair in pairs:
        images = tuple(pair.images)
        _check_images(images, image_tokens, pair.where or "a pair")
        p, c, r = encode_dpo(tokenizer, pair)
        if image_tokens:
            p, _ = expand_image_tokens(p, [False] * len(p), image_id, image_tokens)
        room = max_len + 1 - len(p)
        if room < 1:
            dropped += 1
            continue
        c, r = c[:room], r[:room]
        out.append(DPOExample(*(np.asarray(x, dtype=np.int32) for x in (p, c, r)), images))
    return out, dropped


class DPODataset:
    """Rows hold both sequences of a pair; targets cover the completion only. `ref` (filled by the
    DPO stage when reference log-probs are precomputed) is an [N, 2] array of (chosen, rejected)."""

    def __init__(self, examples: list[DPOExample], image_loader=None):
        self.examples = examples
        self.image_loader = image_loader
        self.ref: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def fingerprint(self) -> str:
        return _examples_fingerprint(self.examples, type(self).__name__)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        e = self.examples[i]
        row: dict[str, torch.Tensor] = {"index": torch.tensor(i)}
        for name, completion in (("chosen", e.chosen), ("rejected", e.rejected)):
            ids = np.concatenate([e.prompt, completion])
            trained = np.zeros(len(ids), dtype=bool)
            trained[len(e.prompt) :] = True
            r = _row(ids, trained)
            row[f"{name}_input_ids"], row[f"{name}_targets"] = r["input_ids"], r["targets"]
        if self.ref is not None:
            row["ref_logps"] = torch.from_numpy(self.ref[i])
        if self.image_loader is not None:
            row["pixel_values"] = self.image_loader(e.images)
        return row


def dpo_collate(pad_id: int):
    """Chosen rows then rejected rows in one right-padded batch [2B, T]."""
    pad = pad_collate(pad_id)

    def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        seqs = [
            {"input_ids": r[f"{k}_input_ids"], "targets": r[f"{k}_targets"]}
            for k in ("chosen", "rejected")
            for r in rows
        ]
        batch = pad(seqs)
        batch["index"] = torch.stack([r["index"] for r in rows])
        if "pixel_values" in rows[0]:  # the chosen rows' images, then the rejected rows' (the same prompts)
            batch["pixel_values"] = torch.cat([r["pixel_values"] for r in rows] * 2)
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = torch.stack([r["ref_logps"] for r in rows])
        return batch

    return collate
