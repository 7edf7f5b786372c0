"""Byte-level BPE tokenizer trained with `tokenizers`, saved so `transformers.AutoTokenizer` loads it.

- Special tokens, each a single id in this order from 0: <|endoftext|> (document separator),
  <|im_start|>, <|im_end|> (ChatML), <think>, </think> (reasoning; stored as *non-special* added
  tokens so `skip_special_tokens=True` keeps them visible to the think-mode parser), <|image|> (VLM
  placeholder), <|pad|>.
- Pre-tokenizer: Qwen2-style split where every digit is its own piece (arithmetic stays learnable),
  then byte-level mapping, so any Unicode text round-trips exactly and whitespace/newlines survive.
- Chat template: ChatML with a thinking switch in the Qwen3 convention (see CHAT_TEMPLATE).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .data import iter_records_text
from .errors import UserError

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
IMAGE = "<|image|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END, IMAGE, PAD)
NON_SPECIAL_ADDED = (THINK_START, THINK_END)

# Qwen2's split pattern: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, and whitespace that does not swallow the next word's space.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML with a thinking switch (Qwen3 convention).
# - A system message, if any, comes first.
# - Assistant turns carry their reasoning either as `reasoning_content` or inline as
#   "<think>...</think>answer". Turns after the last user message (the one being answered, or being
#   trained on) keep their reasoning as "<think>\n{reasoning}\n</think>\n\n{answer}"; earlier turns
#   drop it ("{answer}" only), as Qwen3 does, unless `keep_past_thinking=true` is passed.
# - add_generation_prompt opens an assistant turn. With enable_thinking=false it pre-fills the empty
#   block "<think>\n\n</think>\n\n" so the model answers directly; with thinking on (the default) the
#   model writes its own "<think>" block.
CHAT_TEMPLATE = r"""{%- set ns = namespace(last_user=-1) -%}
{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in messages -%}
{%- if m['role'] == 'assistant' -%}
{%- set content = m['content'] if m['content'] is string else '' -%}
{%- set reasoning = m['reasoning_content'] if m['reasoning_content'] is string else '' -%}
{%- if '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
{%- set content = content.split('</think>')[-1] -%}
{%- endif -%}
{%- set reasoning = reasoning.strip('\n') -%}
{%- set content = content.lstrip('\n') -%}
{{- '<|im_start|>assistant\n' -}}
{%- if loop.index0 > ns.last_user or keep_past_thinking is true -%}
{{- '<think>\n' + reasoning + '\n</think>\n\n' -}}
{%- endif -%}
{{- content + '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}{%- endif -%}
{%- endif -%}"""


def iter_training_text(paths: Iterable[str | Path]) -> Iterator[str]:
    """Text for tokenizer training from .txt files and .jsonl files (text, messages, or DPO pairs)."""
    for p in paths:
        yield from iter_records_text(Path(p))


def train_tokenizer(paths: list[str | Path], vocab_size: int, out_dir: str | Path, quiet: bool = False) -> dict:
    """Train on the files, save an AutoTokenizer-loadable directory, return statistics."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise UserError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS) + 1} (256 bytes + specials)")
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{p}: data file not found")
    tok = Tokenizer(models.BPE())
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
        for text in iter_training_text(paths):
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
    return out


def load_tokenizer(path: str | Path):
    """The saved tokenizer through transformers (the same object a user of the export gets)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer.json").exists():
        raise UserError(f"{p}: not a tokenizer directory (no tokenizer.json)")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def special_token_ids(tokenizer) -> dict[str, int]:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise UserError(f"tokenizer lacks the special token(s) {', '.join(missing)}")
    return ids
