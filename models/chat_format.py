"""The chat format, defined once: the special tokens, ChatML's pieces, the think tags and the chat template.

Every module that writes, parses or masks chat text takes its strings from here (the tokenizer, the
chat-data masks, the think parser, the synthetic data, export's generation config).

- Special tokens, each a single id in this order from 0 in a tokenizer this project trains:
  <|endoftext|> (document separator), <|im_start|>, <|im_end|> (ChatML), <think>, </think> (reasoning;
  stored as *non-special* added tokens so decoding with `skip_special_tokens=True` keeps them visible to
  the think parser), <|image|> (the VLM's image placeholder), <|pad|>.
- An assistant turn with reasoning reads "<think>\\n{reasoning}\\n</think>\\n\\n{answer}"; with thinking
  switched off the template pre-fills the empty block "<think>\\n\\n</think>\\n\\n" and the model answers.
"""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"
IMAGE = "<|image|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END, IMAGE, PAD)
NON_SPECIAL_ADDED = (THINK_START, THINK_END)  # single tokens that decoding keeps
STOP_TOKENS = (IM_END, ENDOFTEXT)  # generation of a chat reply ends at either

ASSISTANT_HEADER = f"{IM_START}assistant\n"
EMPTY_THINK = f"{THINK_START}\n\n{THINK_END}\n\n"  # what the template pre-fills when thinking is off


def assistant_text(reasoning: str, answer: str, think: bool = True) -> str:
    """An assistant turn's content: the reasoning in a think block, then the answer (an empty block when
    thinking is off)."""
    return f"{THINK_START}\n{reasoning}\n{THINK_END}\n\n{answer}" if think else f"{EMPTY_THINK}{answer}"


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


# How transformers turns a generated reply back into a message (its `response_template`, read by
# `tokenizer.parse_response` and the text-generation pipeline, transformers >= 5.13): the reasoning
# inside <think>...</think> as `reasoning_content`, the rest up to the end of the turn as `content`,
# both stripped of the newlines around them, the same split as models/think.py makes.
RESPONSE_TEMPLATE = {
    "version": 1,
    "start_anchor": ASSISTANT_HEADER,
    "defaults": {"role": "assistant"},
    "fields": {
        "reasoning_content": {"open": THINK_START, "close": THINK_END},
        "content": {"close": [IM_END, ENDOFTEXT]},
    },
}
