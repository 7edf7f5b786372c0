"""Verifiable rewards for the RL stage (train/grpo.py): the answer parser and the reward functions.

A reward function takes one sampled completion (the decoded text after the prompt, think tags kept,
the stop token not included) and the record's expected answer, and returns a float:

    def my_reward(completion: str, answer: str, finished: bool) -> float

`finished` says whether the completion ended with a stop token (False: cut at --max-new-tokens).
The built-in ones are in REWARDS; `--reward NAME=WEIGHT` picks them, and `--reward pkg.module:function=W`
imports a function of the user's. The reward of a sample is the weighted sum; a function that raises or
returns something that is not a finite number stops the run with one error naming it, the record and
the completion.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from models.chat_format import THINK_END, THINK_START

from .errors import UserError

RewardFn = Callable[[str, str, bool], float]


def parse_answer(completion: str, thinking: bool = True) -> str | None:
    """The final answer of a completion, or None when there is none to read.

    Thinking on: the text after the one closing </think>, stripped; None when there is no </think>,
    more than one think block, or nothing after it. Thinking off (the prompt pre-filled an empty think
    block): the whole text, stripped; None when it holds think tags or is empty."""
    if not thinking:
        answer = completion.strip()
        return answer if answer and THINK_START not in answer and THINK_END not in answer else None
    if completion.count(THINK_END) != 1 or completion.count(THINK_START) > 1:
        return None
    answer = completion.split(THINK_END, 1)[1].strip()
    return answer or None


def exact_answer(completion: str, answer: str, finished: bool) -> float:
    """1 when the parsed answer equals the expected one exactly, else 0."""
    return float(parse_answer(completion) == answer.strip())


def well_formed(completion: str, answer: str, finished: bool) -> float:
    """1 for the format the model is asked for, else 0: one think block opened at the start and closed,
    then a non-empty one-line answer, then the end of the turn (a stop token; nothing after the answer)."""
    text = completion.lstrip()
    if not (finished and text.startswith(THINK_START)):
        return 0.0
    parsed = parse_answer(text)
    return float(parsed is not None and "\n" not in parsed)


REWARDS: dict[str, RewardFn] = {"exact": exact_answer, "format": well_formed}
DEFAULT_REWARDS = ("exact=1.0", "format=0.1")


@dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float


def load_reward(spec: str) -> Reward:
    """NAME[=WEIGHT] (a built-in) or MODULE:FUNCTION[=WEIGHT] (imported); the weight defaults to 1."""
    name, _, weight_text = spec.partition("=")
    try:
        weight = float(weight_text) if weight_text else 1.0
    except ValueError:
        raise UserError(f"--reward {spec}: the weight {weight_text!r} is not a number") from None
    if not math.isfinite(weight):
        raise UserError(f"--reward {spec}: the weight must be finite")
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"--reward {spec}: cannot import {name} ({e})") from None
        if not callable(fn):
            raise UserError(f"--reward {spec}: {name} is not a function")
    elif name in REWARDS:
        fn = REWARDS[name]
    else:
        raise UserError(f"--reward {spec}: unknown reward {name!r}; built in: {', '.join(REWARDS)}, or MODULE:FUNCTION")
    return Reward(name, fn, weight)


def score(
    rewards: list[Reward], completion: str, answer: str, finished: bool, where: str
) -> tuple[float, dict[str, float]]:
    """(the weighted sum of the rewards of one completion, each reward's own value); a reward that raises
    or gives a value that is not a finite number is a UserError naming the reward, the record (`where`)
    and the completion."""
    total, each = 0.0, {}
    shown = lambda: repr(completion if len(completion) <= 200 else completion[:200] + "...")  # noqa: E731
    for r in rewards:
        try:
            value = r.fn(completion, answer, finished)
        except Exception as e:  # noqa: BLE001 - a user's reward function may raise anything
            raise UserError(f"reward {r.name} raised {type(e).__name__}: {e} ({where}; completion {shown()})") from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise UserError(f"reward {r.name} returned {value!r}, not a number ({where}; {shown()})") from None
        if not math.isfinite(value):
            raise UserError(f"reward {r.name} returned {value} ({where}; completion {shown()})")
        total += r.weight * value
        each[r.name] = value
    return total, each
