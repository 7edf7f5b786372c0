"""Plain text continuation from a checkpoint (the chat with think mode is built on models.generate)."""

from __future__ import annotations

from pathlib import Path

import torch

from models import load_pretrained, resolve_checkpoint
from models.generate import generate

from .errors import UserError
from .tokenizer import ENDOFTEXT, PAD, load_tokenizer


def tokenizer_dir_for(checkpoint) -> Path:
    """The directory whose tokenizer files belong to a checkpoint, run or transformers directory."""
    p = Path(checkpoint)
    return p if (p / "tokenizer.json").exists() else resolve_checkpoint(p)


def check_vocab(tokenizer, model, where) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{model.config.vocab_size}; they do not belong together")


def sample_text(checkpoint, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> str:
    model = load_pretrained(checkpoint)
    tokenizer = load_tokenizer(tokenizer_dir_for(checkpoint))
    check_vocab(tokenizer, model, checkpoint)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not ids:
        raise UserError("--prompt is empty")
    g = torch.Generator().manual_seed(seed)
    stop = [tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    new = generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   stop_ids=stop, pad_id=tokenizer.convert_tokens_to_ids(PAD), generator=g)[0]
    return prompt + tokenizer.decode(new, skip_special_tokens=True)
