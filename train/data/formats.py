"""Reading the data files of the training stages into records (train/data/records.py).

Formats (the ecosystem's usual ones; records come from `.jsonl`, `.jsonl.gz` or `.parquet` files):
- pretraining: `.txt` files (each file is one document) or `{"text": str}` records (train/data/sources.py
  reads those for `llm-scratch prepare`, in bounded memory);
- SFT: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`, or TRL's
  prompt-completion records `{"prompt", "completion"}`, each a string or a list of messages;
- DPO: `{"prompt", "chosen", "rejected"}`, each a string or a list of messages, or TRL's implicit-prompt
  records `{"chosen", "rejected"}` (message lists whose shared beginning is the prompt);
- VLM records add `"images": ["path.png", ...]` (relative to the data file), one `<|image|>` each.
A malformed record stops the run with `DataError("FILE:LINE: what is wrong")` (parquet: "FILE: row N").
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

from models.chat_format import IMAGE

from ..errors import DataError, UserError
from .images import check_image
from .records import Conversation, PreferencePair
from .sources import parse_json_line

ROLES = ("system", "user", "assistant")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a .jsonl (or .jsonl.gz) file; bad JSON or a
    non-object is a DataError."""
    path = Path(path)
    _check_file(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                rec = parse_json_line(raw)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            if rec is not None:
                yield lineno, rec


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """("FILE:LINE" or "FILE: row N", record) from a .jsonl, .jsonl.gz or .parquet file."""
    path = Path(path)
    if path.suffix != ".parquet":
        for lineno, rec in read_jsonl(path):
            yield f"{path}:{lineno}", rec
        return
    _check_file(path)
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    n = 0
    for rg in range(pf.metadata.num_row_groups):  # one row group in memory at a time
        for rec in pf.read_row_group(rg).to_pylist():
            n += 1  # a column a row lacks reads as null: drop those, as a jsonl record would not have them
            yield f"{path}: row {n}", {k: v for k, v in rec.items() if v is not None}


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


def _turns(value, where: str, field: str, role: str) -> list[dict]:
    """A TRL field: a string (one `role` message) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, where, field)


def sft_record(
    rec: dict, path: str | Path, where: str, need_assistant: bool = True, images_anywhere: bool = False
) -> Conversation:
    if "messages" not in rec and "prompt" in rec and "completion" in rec:  # TRL's prompt-completion records
        msgs = _turns(rec["prompt"], where, "prompt", "user") + _turns(
            rec["completion"], where, "completion", "assistant"
        )
    elif "messages" not in rec:
        raise DataError(
            f"{where}: field 'messages' must be a non-empty list of messages (or give 'prompt' and 'completion')"
        )
    else:
        msgs = _messages(rec.get("messages"), where, "messages")
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: field 'messages' has no assistant turn to learn from")
    images = _images(rec, Path(path), where, [m["content"] for m in msgs], images_anywhere)
    return Conversation(msgs, images, where)


def load_sft(path: str | Path, images_anywhere: bool = False) -> list[Conversation]:
    """Conversations; each must contain at least one assistant turn. VLM records add 'images'."""
    return [sft_record(rec, path, where, True, images_anywhere) for where, rec in read_records(path)]


def load_dpo(path: str | Path, images_anywhere: bool = False) -> list[PreferencePair]:
    """Preference pairs; chosen/rejected given as message lists keep their last (assistant) message."""
    return [dpo_record(rec, path, where, images_anywhere) for where, rec in read_records(path)]


def dpo_record(rec: dict, path: str | Path, where: str, images_anywhere: bool = False) -> PreferencePair:
    if "prompt" not in rec and isinstance(rec.get("chosen"), list) and isinstance(rec.get("rejected"), list):
        rec = implicit_prompt(rec, where)
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
    return PreferencePair(prompt, completions["chosen"], completions["rejected"], images, where)


def implicit_prompt(rec: dict, where: str) -> dict:
    """TRL's implicit-prompt pair: the messages chosen and rejected share are the prompt."""
    chosen, rejected = _messages(rec["chosen"], where, "chosen"), _messages(rec["rejected"], where, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no first message to take as one")
    return {**rec, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def iter_records_text(path: Path) -> Iterator[str]:
    """Every piece of text in a file of any supported format (for tokenizer training): documents of .txt
    files and `datasets` directories, and the text, messages, prompts and completions of records."""
    if path.suffix == ".txt" or path.is_dir():
        from .sources import iter_documents

        yield from iter_documents([path])
        return
    for where, rec in read_records(path):
        if isinstance(rec.get("text"), str):
            yield rec["text"]
            continue
        fields = [k for k in ("messages", "prompt", "completion", "chosen", "rejected") if k in rec]
        if not fields:
            raise DataError(f"{where}: no 'text', 'messages', 'prompt'/'completion' or 'chosen'/'rejected' field")
        for k in fields:
            v = rec[k]
            if isinstance(v, str):
                yield v
            else:
                yield from (m["content"] for m in _messages(v, where, k))
