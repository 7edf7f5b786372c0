"""`llm-scratch sample`: plain text continuation from a checkpoint (chat with think mode is train/chat.py)."""

from __future__ import annotations

import torch

from models import load_pretrained
from models.chat_format import ENDOFTEXT, PAD
from models.generate import generate

from .data.tokenizer import check_vocab, load_tokenizer, tokenizer_dir_for
from .errors import UserError


def sample_text(
    checkpoint,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> str:
    model = load_pretrained(checkpoint)
    tokenizer = load_tokenizer(tokenizer_dir_for(checkpoint))
    check_vocab(tokenizer, model, checkpoint)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if not ids:
        raise UserError("--prompt is empty")
    if len(ids) > model.config.max_position_embeddings:
        raise UserError(
            f"--prompt is {len(ids)} tokens, longer than the model's context "
            f"(max_position_embeddings={model.config.max_position_embeddings})"
        )
    g = torch.Generator().manual_seed(seed)
    stop = [tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    new = generate(
        model,
        [ids],
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=stop,
        pad_id=tokenizer.convert_tokens_to_ids(PAD),
        generator=g,
    )[0]
    return prompt + tokenizer.decode(new, skip_special_tokens=True)
