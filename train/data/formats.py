"""Reading the data files of the training stages into records (train/data/records.py).

Formats (the ecosystem's usual ones):
- pretraining: `.txt` files (each file is one document) or `.jsonl` with `{"text": str}` per line;
- SFT: `.jsonl` with `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`;
- DPO: `.jsonl` with `{"prompt", "chosen", "rejected"}`, each a string or a list of messages;
- VLM records add `"images": ["path.png", ...]` (relative to the jsonl file), one `<|image|>` each.
A malformed record stops the run with `DataError("FILE:LINE: what is wrong")`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from models.chat_format import IMAGE

from ..errors import DataError, UserError
from .images import check_image
from .records import Conversation, PreferencePair

ROLES = ("system", "user", "assistant")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; bad JSON or a non-object is a DataError."""
    path = Path(path)
    _check_file(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            if "\\u" in line:  # an escaped lone surrogate decodes to a string no tokenizer can encode
                try:
                    json.dumps(rec, ensure_ascii=False).encode("utf-8")
                except UnicodeEncodeError:
                    raise DataError(f"{path}:{lineno}: a string holds a lone surrogate (\\ud800-\\udfff)") from None
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
        try:
            yield path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
        return
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: pretraining data must be .txt or .jsonl with a 'text' field")
    for lineno, rec in read_jsonl(path):
        text = rec.get("text")
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field 'text' must be a string")
        yield text


def _images(rec: dict, path: Path, where: str, texts: list[str], anywhere: bool = False) -> list[Path]:
    """The record's 'images' (paths relative to the jsonl file), checked against its placeholders, kept
    inside the data file's directory (unless `anywhere`), and each decoded once (train/data/images.py), so
    a bad image is found before training starts."""
    images = rec.get("images", [])
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise DataError(f"{where}: field 'images' must be a list of file paths")
    placeholders = sum(t.count(IMAGE) for t in texts)
    if placeholders != len(images):
        raise DataError(f"{where}: {placeholders} {IMAGE} placeholder(s) but {len(images)} image(s)")
    root = Path(path).parent
    resolved = [root / x for x in images]
    for i, p in enumerate(resolved):
        if not anywhere and not p.resolve().is_relative_to(root.resolve()):
            raise DataError(f"{where}: images[{i}]: {images[i]} lies outside {root} (--images-anywhere allows it)")
        if not p.is_file():
            raise DataError(f"{where}: images[{i}]: no such file {p}")
        try:
            check_image(p)
        except UserError as e:
            raise DataError(f"{where}: images[{i}]: {e}") from None
    return resolved


def sft_record(
    rec: dict, path: str | Path, where: str, need_assistant: bool = True, images_anywhere: bool = False
) -> Conversation:
    msgs = _messages(rec.get("messages"), where, "messages")
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")
    images = _images(rec, Path(path), where, [m["content"] for m in msgs], images_anywhere)
    return Conversation(msgs, images, where)


def load_sft(path: str | Path, images_anywhere: bool = False) -> list[Conversation]:
    """Conversations; each must contain at least one assistant turn. VLM records add 'images'."""
    return [sft_record(rec, path, f"{path}:{lineno}", True, images_anywhere) for lineno, rec in read_jsonl(path)]


def load_dpo(path: str | Path, images_anywhere: bool = False) -> list[PreferencePair]:
    """Preference pairs; chosen/rejected given as message lists keep their last (assistant) message."""
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
        completions = {}
        for k in ("chosen", "rejected"):
            v = rec[k]
            if isinstance(v, list):
                msgs = _messages(v, where, k)
                if msgs[-1]["role"] != "assistant":
                    raise DataError(f"{where}: field '{k}' must end with an assistant message")
                v = msgs[-1]["content"]
            elif not isinstance(v, str):
                raise DataError(f"{where}: field '{k}' must be a string or a list of messages")
            completions[k] = v
        if completions["chosen"] == completions["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same text; a pair must differ")
        images = _images(rec, Path(path), where, [m["content"] for m in prompt], images_anywhere)
        pairs.append(PreferencePair(prompt, completions["chosen"], completions["rejected"], images, where))
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
