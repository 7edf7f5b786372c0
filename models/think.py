"""Think mode: split streamed model text into reasoning (inside <think>...</think>) and answer.

`ThinkParser.feed(chunk)` takes text as it streams (any split, even inside a tag) and returns the
new (kind, text) pieces, kind being "reasoning" or "answer"; `finish()` flushes what it held back.
- A tag split across chunks is held until it can be told from ordinary text.
- No closing tag: everything after <think> stays reasoning.
- Thinking off: the prompt already holds "<think>\\n\\n</think>\\n\\n", so the text is all answer.
- A prompt that opened <think> itself: start with `in_reasoning=True`; a lone </think> ends it.
Whitespace that only separates the tags from the text (the newlines the chat template puts around
the reasoning) is trimmed from the start of each part.
"""

from __future__ import annotations

from .chat_format import THINK_END, THINK_START


class ThinkParser:
    def __init__(self, in_reasoning: bool = False):
        self.state = "reasoning" if in_reasoning else "start"  # start -> reasoning -> answer
        self._held = ""
        self._at_part_start = True  # strip leading whitespace of a part
        self.reasoning = ""
        self.answer = ""

    def _emit(self, kind: str, text: str, out: list) -> None:
        if self._at_part_start:
            text = text.lstrip()
            if not text:
                return
            self._at_part_start = False
        if kind == "reasoning":
            self.reasoning += text
        else:
            self.answer += text
        out.append((kind, text))

    def _switch(self, state: str) -> None:
        self.state = state
        self._at_part_start = True

    def feed(self, chunk: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        text = self._held + chunk
        self._held = ""
        while text:
            if self.state == "start":
                stripped = text.lstrip()
                if not stripped:
                    self._held = text
                    return out
                if stripped.startswith(THINK_START):
                    text = stripped[len(THINK_START) :]
                    self._switch("reasoning")
                elif THINK_START.startswith(stripped):  # maybe the beginning of "<think>"
                    self._held = text
                    return out
                else:
                    self._switch("answer")
            elif self.state == "reasoning":
                i = text.find(THINK_END)
                if i >= 0:
                    self._emit("reasoning", text[:i].rstrip(), out)
                    text = text[i + len(THINK_END) :]
                    self._switch("answer")
                    continue
                keep = _partial_suffix(text, THINK_END)
                body, self._held = text[: len(text) - keep], text[len(text) - keep :]
                # trailing whitespace may precede </think>: hold it until we know
                stripped = body.rstrip()
                self._held = body[len(stripped) :] + self._held
                self._emit("reasoning", stripped, out)
                return out
            else:
                self._emit("answer", text, out)
                return out
        return out

    def finish(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        held, self._held = self._held, ""
        if held:
            self._emit("reasoning" if self.state == "reasoning" else "answer", held.rstrip(), out)
        return out


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """(reasoning, answer) of a whole generated text."""
    p = ThinkParser(in_reasoning)
    p.feed(text)
    p.finish()
    return p.reasoning, p.answer
