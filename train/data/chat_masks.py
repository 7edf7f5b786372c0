"""Conversations rendered with the tokenizer's chat template, and token by token which tokens are
trained on (the SFT loss mask); prompts for generation; the VLM's image-token expansion.

Loss mask (SFT): a token is trained on when it belongs to an assistant turn's content, i.e. it starts
after that turn's "<|im_start|>assistant\\n" and ends at (and includes) its "<|im_end|>": the <think>
block, the answer and <|im_end|>. System and user turns, the role headers, the "\\n" after
<|im_end|> and padding are never trained on. A turn with thinking off (an empty think block) is
trained from its answer on: the empty block is what the template pre-fills for `enable_thinking=False`,
so it belongs to the prompt, and a model in think mode never learns to skip its reasoning. Every
assistant turn of a multi-turn conversation is trained, rendered as the template renders the whole
conversation (earlier turns without their reasoning, the last with it).

"""

from __future__ import annotations

import bisect

from models.chat_format import ASSISTANT_HEADER, EMPTY_THINK, IM_END, IMAGE


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant turn's trained content, <|im_end|> included (an
    empty think block is left out)."""
    spans, pos = [], 0
    while True:
        i = text.find(ASSISTANT_HEADER, pos)
        if i < 0:
            return spans
        start = i + len(ASSISTANT_HEADER)
        if text.startswith(EMPTY_THINK, start):
            start += len(EMPTY_THINK)
        j = text.find(IM_END, start)
        end = len(text) if j < 0 else j + len(IM_END)
        spans.append((start, end))
        pos = end


def encode_with_mask(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    """Token ids of `text` and, per token, whether it lies in an assistant span (by its first char)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = assistant_spans(text)
    starts = [s for s, _ in spans]
    mask = []
    for a, _b in enc["offset_mapping"]:
        k = bisect.bisect_right(starts, a) - 1
        mask.append(k >= 0 and a < spans[k][1])
    return enc["input_ids"], mask


def render_conversation(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def encode_prompt(tokenizer, messages: list[dict], think: bool, image_tokens: int = 0) -> list[int]:
    """Token ids of a conversation with the generation prompt opened (for generation); with
    `image_tokens` (a VLM) each <|image|> placeholder expanded to that many image tokens."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=think)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if image_tokens:
        ids, _ = expand_image_tokens(ids, [False] * len(ids), tokenizer.convert_tokens_to_ids(IMAGE), image_tokens)
    return ids


def expand_image_tokens(ids: list[int], mask: list[bool], image_id: int, n: int) -> tuple[list[int], list[bool]]:
    """Each <|image|> placeholder becomes n image tokens (the slots of the image's features)."""
    out_ids, out_mask = [], []
    for i, m in zip(ids, mask):
        k = n if i == image_id else 1
        out_ids.extend([i] * k)
        out_mask.extend([m and i != image_id] * k)
    return out_ids, out_mask
