"""Byte-level BPE tokenizer trained with `tokenizers`, saved so `transformers.AutoTokenizer` loads it.

- Special tokens (models/chat_format.py), each a single id in order from 0; <think> and </think> are
  *non-special* added tokens, so `skip_special_tokens=True` keeps them visible to the think parser.
- Normalizer: NFC (as Qwen2's; transformers loads an export with Qwen2Tokenizer, which applies it).
- Pre-tokenizer: Qwen2-style split where every digit is its own piece (arithmetic stays learnable),
  then byte-level mapping, so any Unicode text round-trips exactly and whitespace/newlines survive.
- Chat template: ChatML with a thinking switch in the Qwen3 convention (models/chat_format.py).
Also here: which tokenizer belongs to a checkpoint, and the check that it fits the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from models import resolve_checkpoint
from models.chat_format import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    IMAGE,
    NON_SPECIAL_ADDED,
    PAD,
    SPECIAL_TOKENS,
)
from models.checkpoint import make_tokenizer_config_portable

from ..errors import UserError
from .formats import iter_records_text

# Qwen2's split pattern: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, and whitespace that does not swallow the next word's space.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def iter_training_text(paths: Iterable[str | Path], max_bytes: int | None = None) -> Iterator[str]:
    """Text for tokenizer training from every input (documents, messages, DPO pairs), streamed. With
    `max_bytes`, each input gives its share of that many bytes (in proportion to its size), taken evenly
    along it: a document is kept whenever the kept share falls behind (error diffusion), so the sample spans
    the whole corpus and memory holds one document at a time."""
    paths = [Path(p) for p in paths]
    total = sum(
        sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size for p in paths
    )
    keep = 1.0 if max_bytes is None else min(1.0, max_bytes / max(1, total))
    for p in paths:
        owed = 0.0
        for text in iter_records_text(p):
            n = len(text.encode("utf-8"))
            owed += n * keep
            if owed >= n or keep == 1.0:
                owed -= n
                yield text


def train_tokenizer(
    paths: list[str | Path], vocab_size: int, out_dir: str | Path, quiet: bool = False, max_bytes: int | None = None
) -> dict:
    """Train on the files, save an AutoTokenizer-loadable directory, return statistics."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise UserError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS) + 1} (256 bytes + specials)")
    for p in paths:
        if not Path(p).exists():
            raise UserError(f"{p}: data file not found")
    tok = Tokenizer(models.BPE())
    # NFC first, as Qwen2's tokenizer does: transformers loads any `qwen2` export with Qwen2Tokenizer, which
    # normalises to NFC, so a tokenizer that did not would encode "e" + U+0301 differently after export.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=not quiet,
    )
    t0 = time.perf_counter()
    n_bytes = 0

    def counted():
        nonlocal n_bytes
        for text in iter_training_text(paths, max_bytes):
            n_bytes += len(text.encode("utf-8"))
            yield text

    tok.train_from_iterator(counted(), trainer=trainer)
    seconds = time.perf_counter() - t0
    save_tokenizer(tok, out_dir)
    return {"bytes": n_bytes, "seconds": seconds, "vocab_size": tok.get_vocab_size()}


def save_tokenizer(tok, out_dir: str | Path) -> Path:
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # <think> and </think> stay single added tokens but are not "special": decoding with
    # skip_special_tokens=True keeps them, so the reasoning can be told from the answer.
    spec = json.loads(tok.to_str())
    for t in spec["added_tokens"]:
        if t["content"] in NON_SPECIAL_ADDED:
            t["special"] = False
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=ENDOFTEXT,
        pad_token=PAD,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END, IMAGE],
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    make_tokenizer_config_portable(out)  # loads in transformers 4.x and 5.x alike
    return out


def load_tokenizer(path: str | Path):
    """The saved tokenizer through transformers (the same object a user of the export gets)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer.json").exists():
        raise UserError(f"{p}: not a tokenizer directory (no tokenizer.json)")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def tokenizer_fingerprint(tokenizer_dir: str | Path) -> str:
    """What decides the ids a text encodes to: the whole tokenizer.json, canonically serialised."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def fits_project(tokenizer) -> bool:
    """Has every special token this project uses, and its chat template."""
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in SPECIAL_TOKENS) and tokenizer.chat_template == CHAT_TEMPLATE


def adopt_tokenizer(tokenizer) -> list[str]:
    """Make another model's tokenizer fit this project, in place: add the special tokens it lacks (ChatML,
    <think>/</think> as non-special added tokens, <|image|>, <|pad|>) and install the chat template with the
    thinking switch. Returns what was added."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    added = [t for t in SPECIAL_TOKENS if t not in vocab]
    special = [AddedToken(t, special=True, normalized=False) for t in added if t not in NON_SPECIAL_ADDED]
    plain = [AddedToken(t, special=False, normalized=False) for t in added if t in NON_SPECIAL_ADDED]
    if special:
        tokenizer.add_tokens(special, special_tokens=True)
    if plain:
        tokenizer.add_tokens(plain)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD
    if tokenizer.chat_template != CHAT_TEMPLATE:
        tokenizer.chat_template = CHAT_TEMPLATE
        added.append("the chat template (ChatML with the thinking switch)")
    return added


def install_tokenizer(src: str | Path, dest: Path, quiet: bool = False):
    """The tokenizer at `src`, made fit for this project when it is not (adopt_tokenizer), saved at `dest`.
    Returns (dest, the loaded tokenizer); `dest` is rewritten only when what it holds differs."""
    tokenizer = load_tokenizer(src)
    added = adopt_tokenizer(tokenizer)
    if added and not quiet:
        print(f"tokenizer: {src} lacked {', '.join(added)}; added (now {len(tokenizer)} tokens)", flush=True)
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    make_tokenizer_config_portable(tmp)
    if (dest / "tokenizer.json").is_file() and tokenizer_fingerprint(dest) == tokenizer_fingerprint(tmp):
        shutil.rmtree(tmp)
    else:
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    return dest, load_tokenizer(dest)


def special_token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise UserError(f"tokenizer lacks the special token(s) {', '.join(missing)}")
    return ids


def tokenizer_dir_for(checkpoint) -> Path:
    """The directory whose tokenizer files belong to a checkpoint, run or transformers directory."""
    p = Path(checkpoint)
    return p if (p / "tokenizer.json").exists() else resolve_checkpoint(p)


def check_vocab(tokenizer, model, where) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}; they do not belong together"
        )


def vocab_of(tokenizer_dir: Path) -> tuple:
    """What makes two tokenizers the same: the BPE vocabulary and merges and the added tokens."""
    spec = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text())
    model = spec.get("model", {})
    added = sorted((t["id"], t["content"]) for t in spec.get("added_tokens", []))
    return json.dumps(model.get("vocab"), sort_keys=True), json.dumps(model.get("merges")), tuple(added)
