"""Reading user data, tokenizing and packing it into training rows, and a resumable batch order.

Formats (the ecosystem's usual ones):
- pretraining: `.txt` files (each file is one document) or `.jsonl` with `{"text": str}` per line;
- SFT: `.jsonl` with `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`;
- DPO: `.jsonl` with `{"prompt", "chosen", "rejected"}`, each a string or a list of messages.
A malformed record stops the run with `DataError("FILE:LINE: what is wrong")`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from models import IGNORE_INDEX

from .errors import UserError

ROLES = ("system", "user", "assistant")


class DataError(UserError):
    """A missing file or malformed record; the message starts with FILE:LINE."""


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; bad JSON or a non-object is a DataError."""
    path = Path(path)
    _check_file(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def _messages(value, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: {field}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def iter_pretrain_texts(path: str | Path) -> Iterator[str]:
    path = Path(path)
    _check_file(path)
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
        return
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: pretraining data must be .txt or .jsonl with a 'text' field")
    for lineno, rec in read_jsonl(path):
        text = rec.get("text")
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field 'text' must be a string")
        yield text


IMAGE_PLACEHOLDER = "<|image|>"


class Conversation(list):
    """A list of messages that may carry images (paths, in placeholder order) and where it came from."""

    def __init__(self, messages, images=(), where: str = ""):
        super().__init__(messages)
        self.images: list[Path] = list(images)
        self.where = where


def _images(rec: dict, path: Path, where: str, texts: list[str]) -> list[Path]:
    """The record's 'images' (paths relative to the jsonl file), checked against its placeholders."""
    images = rec.get("images", [])
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise DataError(f"{where}: field 'images' must be a list of file paths")
    placeholders = sum(t.count(IMAGE_PLACEHOLDER) for t in texts)
    if placeholders != len(images):
        raise DataError(f"{where}: {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
    resolved = [(Path(path).parent / x) for x in images]
    for i, p in enumerate(resolved):
        if not p.is_file():
            raise DataError(f"{where}: images[{i}]: no such file {p}")
    return resolved


def sft_record(rec: dict, path: str | Path, where: str, need_assistant: bool = True) -> Conversation:
    msgs = _messages(rec.get("messages"), where, "messages")
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")
    return Conversation(msgs, _images(rec, Path(path), where, [m["content"] for m in msgs]), where)


def load_sft(path: str | Path) -> list[Conversation]:
    """Conversations; each must contain at least one assistant turn. VLM records add 'images'."""
    return [sft_record(rec, path, f"{path}:{lineno}") for lineno, rec in read_jsonl(path)]


def load_dpo(path: str | Path) -> list[dict]:
    """Pairs as {'prompt': [messages], 'chosen': str, 'rejected': str, 'images': [paths], 'where': str}."""
    pairs = []
    for lineno, rec in read_jsonl(path):
        where = f"{path}:{lineno}"
        for k in ("prompt", "chosen", "rejected"):
            if k not in rec:
                raise DataError(f"{where}: missing field '{k}'")
        prompt = rec["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _messages(prompt, where, "prompt")
        pair = {"prompt": prompt}
        for k in ("chosen", "rejected"):
            v = rec[k]
            if isinstance(v, list):
                msgs = _messages(v, where, k)
                if msgs[-1]["role"] != "assistant":
                    raise DataError(f"{where}: field '{k}' must end with an assistant message")
                v = msgs[-1]["content"]
            elif not isinstance(v, str):
                raise DataError(f"{where}: field '{k}' must be a string or a list of messages")
            pair[k] = v
        texts = [m["content"] for m in prompt]
        pair["images"] = _images(rec, Path(path), where, texts)
        pair["where"] = where
        pairs.append(pair)
    return pairs


def iter_records_text(path: Path) -> Iterator[str]:
    """Every piece of text in a file of any supported format (for tokenizer training)."""
    if path.suffix == ".txt":
        yield from iter_pretrain_texts(path)
        return
    for lineno, rec in read_jsonl(path):
        if isinstance(rec.get("text"), str):
            yield rec["text"]
        elif "messages" in rec:
            yield from (m["content"] for m in _messages(rec["messages"], f"{path}:{lineno}", "messages"))
        elif "chosen" in rec:
            for k in ("prompt", "chosen", "rejected"):
                v = rec.get(k)
                if isinstance(v, str):
                    yield v
                elif isinstance(v, list):
                    yield from (m["content"] for m in _messages(v, f"{path}:{lineno}", k))
        else:
            raise DataError(f"{path}:{lineno}: no 'text', 'messages' or 'prompt'/'chosen'/'rejected' field")


# ---------------------------------------------------------------- packing

def tokenize_documents(texts: list[str], tokenizer, eot_id: int) -> np.ndarray:
    """One token stream: each document followed by <|endoftext|>."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    total = sum(len(x) + 1 for x in ids)
    out = np.empty(total, dtype=np.int32)
    pos = 0
    for x in ids:
        out[pos : pos + len(x)] = x
        out[pos + len(x)] = eot_id
        pos += len(x) + 1
    return out


def load_token_stream(paths: list[str | Path], tokenizer, eot_id: int) -> np.ndarray:
    texts = [t for p in paths for t in iter_pretrain_texts(p)]
    return tokenize_documents(texts, tokenizer, eot_id)


class PackedDataset:
    """Fixed-length rows cut from a token stream: row i covers stream[i*T : i*T + T + 1], so every
    token is a target exactly once. With `document_mask` (default), each row also carries segment
    ids (documents cannot attend to each other) and position ids that restart at each document.
    """

    def __init__(self, stream: np.ndarray, seq_len: int, eot_id: int, document_mask: bool = True):
        self.stream, self.seq_len, self.eot_id, self.document_mask = stream, seq_len, eot_id, document_mask
        self.num_rows = max(0, (len(stream) - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t = self.seq_len
        chunk = torch.from_numpy(self.stream[i * t : i * t + t + 1].astype(np.int64))
        inputs, targets = chunk[:-1], chunk[1:]
        row = {"input_ids": inputs, "targets": targets}
        if self.document_mask:
            row["segment_ids"], row["position_ids"] = segments_and_positions(inputs, self.eot_id)
        return row


def segments_and_positions(inputs: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A new document starts after every <|endoftext|>; positions count from 0 within each."""
    is_eot = (inputs == eot_id).long()
    seg = torch.cumsum(is_eot, 0) - is_eot  # the eot belongs to the document it ends
    idx = torch.arange(len(inputs))
    starts = torch.zeros_like(idx)
    boundary = torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1
    starts[boundary] = boundary
    starts = torch.cummax(starts, 0).values
    return seg, idx - starts


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class BatchOrder:
    """Seeded shuffled order over a dataset's rows, epoch after epoch, with a saveable position.

    Each global batch of `batch_size * world_size` rows is split so rank r takes its own slice, so
    data-parallel ranks never see the same row in a step and the global batch equals a 1-rank run's.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        global_batch = batch_size * world_size
        if num_rows < global_batch:
            raise UserError(
                f"the data gives {num_rows} rows but one global batch needs {global_batch}: "
                "add data, or lower --batch-size or --seq-len"
            )
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)

    def next_indices(self) -> list[int]:
        global_batch = self.batch_size * self.world_size
        if self.cursor + global_batch > self.num_rows:  # drop the ragged tail, start a new epoch
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.cursor : self.cursor + global_batch]
        self.cursor += global_batch
        start = self.rank * self.batch_size
        return idx[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows or state["seed"] != self.seed:
            raise UserError(
                f"cannot resume: the checkpoint's data had {state['num_rows']} rows (seed {state['seed']}), "
                f"this run's has {self.num_rows} (seed {self.seed}); resume with the same data and seed"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation()


__all__ = [
    "IGNORE_INDEX",
    "BatchOrder",
    "DataError",
    "PackedDataset",
    "collate",
    "iter_pretrain_texts",
    "load_dpo",
    "load_sft",
    "load_token_stream",
    "read_jsonl",
    "segments_and_positions",
    "tokenize_documents",
]
