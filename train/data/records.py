"""The records the data files hold, as small dataclasses (formats.py reads them, with their checks).

Messages are plain dicts {"role": "system" | "user" | "assistant", "content": str}, the shape the chat
template takes. `where` is "FILE:LINE", for error messages about the record later on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Conversation:
    """An SFT record: the messages, and the images (paths, in placeholder order) a VLM record shows."""

    messages: list[dict]
    images: list[Path] = field(default_factory=list)
    where: str = ""


@dataclass
class PreferencePair:
    """A DPO record: the prompt messages, the chosen and the rejected completion (assistant text)."""

    prompt: list[dict]
    chosen: str
    rejected: str
    images: list[Path] = field(default_factory=list)
    where: str = ""


@dataclass
class EvalRecord:
    """A held-out question with its exact expected answer, grouped by `category` in the results."""

    prompt: list[dict]  # the conversation up to the question (no assistant turn)
    answer: str
    category: str
    images: list[Path] = field(default_factory=list)
    where: str = ""
