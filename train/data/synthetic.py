"""The embedded default data: a seeded, deterministic generator (nothing is downloaded).

Produces, each with a held-out evaluation split that is disjoint from training:
- pretraining text: short English stories, arithmetic facts, and numbers with their digits named by
  place ("3896: thousands 3, hundreds 8, tens 9, ones 6.") or read back (`{"text"}` records);
- SFT conversations (`{"messages"}`): addition and subtraction worked column by column inside
  <think>...</think> before the answer, in a compact notation (one step per line, "7+6=13"), plus a
  few non-arithmetic tasks (reversing a word, comparing numbers, counting letters); about one sample
  in five answers with thinking switched off;
- DPO pairs (`{"prompt", "chosen", "rejected"}`): the correct reasoning and answer against a
  plausible wrong one (a dropped carry or borrow, an off-by-ten slip);
- RL prompts (`{"messages", "answer"}`): questions with their exact answers, operands of 1 to 4 digits
  equally often.
Evaluation records also carry `answer`, the exact expected final answer.

Split rule: a problem (or story) goes to evaluation when the CRC32 of its key is divisible by
EVAL_MODULUS, so the two splits can never share one, whatever the seed or sizes.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Callable
from pathlib import Path

from models.chat_format import assistant_text

EVAL_MODULUS = 10

NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Nora", "Ben", "Lily", "Max", "Ella", "Finn", "Ruby", "Omar"]
ANIMALS = ["cat", "dog", "bird", "fox", "rabbit", "horse", "duck", "frog", "owl", "bear"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown"]
OBJECTS = ["ball", "kite", "book", "hat", "box", "cup", "boat", "drum", "lamp", "bike"]
PLACES = ["park", "garden", "beach", "forest", "market", "school", "river", "farm", "library", "hill"]
FOODS = ["apples", "bread", "soup", "cake", "rice", "pears", "cheese", "carrots"]
WORDS = [
    "river",
    "garden",
    "planet",
    "window",
    "yellow",
    "basket",
    "candle",
    "rocket",
    "silver",
    "pencil",
    "forest",
    "little",
    "button",
    "dragon",
    "marble",
    "castle",
    "winter",
    "summer",
]


def _is_eval(key: str) -> bool:
    return zlib.crc32(key.encode("utf-8")) % EVAL_MODULUS == 0


# ---------------------------------------------------------------- pretraining text


def _story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    animal, color, obj, place, food = (rng.choice(x) for x in (ANIMALS, COLORS, OBJECTS, PLACES, FOODS))
    n = rng.randint(2, 9)
    templates = [
        f"{a} has a {color} {obj}. {a} takes the {obj} to the {place}. At the {place}, {a} meets {b}. "
        f"They play with the {color} {obj} until the sun goes down. Then they walk home together.",
        f"Once upon a time, a little {animal} lived near the {place}. Every morning the {animal} ate {food}. "
        f"One day {a} found the {animal} and gave it {n} more {food}. The {animal} was very happy.",
        f"{a} and {b} went to the {place}. {a} saw {n} {animal}s and {b} saw a {color} {obj}. "
        f'"Look!" said {b}. "The {obj} is {color}." They laughed and sat down to eat {food}.',
        f"The {color} {animal} ran across the {place}. It was looking for {food}. {a} called to it, "
        f"and the {animal} stopped. {a} shared the {food}, and the {animal} stayed all day.",
        f"{a} counted the {obj}s in the {place}. There were {n}. {b} brought {n - 1} more. "
        f"Now there are {2 * n - 1} {obj}s in the {place}.",
    ]
    if rng.random() < 0.15:  # the words the VLM's captions use, so the language model knows them
        from .synthetic_images import caption, random_spec

        spec = random_spec(rng)
        return f"{a} drew a picture for {b}. {caption(spec)} {b} liked the picture."
    return rng.choice(templates)


def _fact(rng: random.Random) -> str:
    x, y = rng.randint(0, 999), rng.randint(0, 999)
    if rng.random() < 0.5:
        return rng.choice([f"{x} + {y} = {x + y}.", f"The sum of {x} and {y} is {x + y}."])
    x, y = max(x, y), min(x, y)
    return rng.choice([f"{x} - {y} = {x - y}.", f"If you take {y} from {x}, you get {x - y}."])


def _digit_fact(rng: random.Random) -> str:
    """A number with its digits named by place, or digits read back into their number: the two copying
    steps of the column reasoning, so pretraining forms the heads that copy a digit from an earlier line
    (before it, SFT spent its first ~400 steps on a loss plateau learning just that)."""
    n = rng.randint(0, 10 ** rng.randint(1, 4) - 1)
    width = max(len(str(n)), rng.randint(1, 4))
    if rng.random() < 0.5:
        return name_digits(n, width)
    return read_digits(_digits(n, width)) + "."


def pretrain_text(rng: random.Random) -> str:
    def part() -> str:
        x = rng.random()
        return _story(rng) if x < 0.6 else _fact(rng) if x < 0.75 else _digit_fact(rng)

    return " ".join(part() for _ in range(rng.randint(1, 3)))


# ---------------------------------------------------------------- column arithmetic with reasoning

PLACE_NAMES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands"]


def _number(out: list[int]) -> int:
    """The number whose digits, lowest first, are `out` (the inverse of _digits)."""
    return int("".join(str(d) for d in reversed(out)))


def _digits(n: int, width: int) -> list[int]:
    return [int(c) for c in str(n).zfill(width)][::-1]  # least significant first


def addition_steps(a: int, b: int, forget_carry: bool = False) -> tuple[list[str], list[int]]:
    """Column addition, one fact per clause (a carry is added as its own step): the step lines and the
    written digits, lowest first. With forget_carry the carries are dropped (a plausible wrong answer)."""
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    steps, carry, out = [], 0, []
    for i in range(width):
        s = da[i] + db[i]
        expr = f"{da[i]}+{db[i]}={s}"
        if carry:
            expr += f", {s}+{carry}={s + carry}"
            s += carry
        digit, new_carry = s % 10, s // 10
        if new_carry:
            steps.append(f"{PLACE_NAMES[i]}: {expr}, write {digit}, carry {new_carry}")
        else:
            steps.append(f"{PLACE_NAMES[i]}: {expr}, write {digit}")
        out.append(digit)
        carry = 0 if forget_carry else new_carry
    if carry:
        steps.append(f"{PLACE_NAMES[width] if width < len(PLACE_NAMES) else 'next'}: write the carry {carry}")
        out.append(carry)
    return steps, out


def name_digits(n: int, width: int) -> str:
    """ "807: hundreds 8, tens 0, ones 7." (zero-padded to `width` places), so a column step finds a
    digit by its place name instead of by counting from the end of the number."""
    named = [f"{PLACE_NAMES[i]} {d}" for i, d in enumerate(_digits(n, width))]
    return f"{n}: " + ", ".join(reversed(named)) + "."


def read_digits(out: list[int], sign: str = "") -> str:
    """The written digits named by place, highest first, then the number they make: each digit is looked
    up by its place name, not by how far back its line is."""
    named = [f"{PLACE_NAMES[i] if i < len(PLACE_NAMES) else 'next'} {d}" for i, d in enumerate(out)]
    return ", ".join(reversed(named)) + f": {sign}{_number(out)}"


def subtraction_steps(a: int, b: int, forget_borrow: bool = False) -> tuple[list[str], list[int]]:
    """Column subtraction of b from a (a >= b): the step lines and the written digits, lowest first; with
    forget_borrow the borrows are dropped.

    Each column first names its two digits ("tens: 4,6: ..."), so deciding whether to borrow is a
    comparison of two digits already on the line, not a lookup and a comparison in one step."""
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    steps, borrow, out = [], 0, []
    for i in range(width):
        top = da[i] - borrow
        parts = [f"{da[i]}-{borrow}={top}"] if borrow else []
        if top < db[i]:
            parts.append(f"{top}<{db[i]}, borrow: {top + 10}-{db[i]}={top + 10 - db[i]}")
            out.append(top + 10 - db[i])
            borrow = 0 if forget_borrow else 1
        else:
            parts.append(f"{top}-{db[i]}={top - db[i]}")
            out.append(top - db[i])
            borrow = 0
        steps.append(f"{PLACE_NAMES[i]}: {da[i]},{db[i]}: " + ", ".join(parts))
    return steps, out


def compare_steps(a: int, b: int) -> tuple[str, int]:
    """Which of a, b (non-negative) is larger, the way one does it by hand: write both with their digits
    named by place (the shorter padded with zeros), then compare from the highest place down to the first
    difference. Returns (text, larger)."""
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width)[::-1], _digits(b, width)[::-1]  # highest place first
    larger = max(a, b)
    parts = []
    for i, (x, y) in enumerate(zip(da, db)):
        place = PLACE_NAMES[width - 1 - i]
        if x == y:
            parts.append(f"{place} {x}={y}")
            continue
        parts.append(f"{place} {x}{'>' if x > y else '<'}{y}")
        break
    verdict = f"so {larger} is larger" if a != b else "so they are equal"
    lines = [name_digits(a, width), name_digits(b, width), f"Compare: {', '.join(parts)}, {verdict}."]
    return "\n".join(lines), larger


def arithmetic_problem(a: int, b: int, op: str, wrong: bool = False) -> tuple[str, str, str, int]:
    """(question, reasoning, answer text, value) for a +/- b; wrong=True gives a plausible error.

    The reasoning is compact: each line does one step and carries only the tokens that step needs (the
    digits by place, one column, the digits read back), since SFT's cost is its token count."""
    question = f"What is {a} {op} {b}?"
    if op == "+":
        steps, out = addition_steps(a, b, forget_carry=wrong)
        width = max(len(str(a)), len(str(b)))
        header = [name_digits(a, width), name_digits(b, width)]
        sign = ""
    else:
        big, small = max(a, b), min(a, b)
        steps, out = subtraction_steps(big, small, forget_borrow=wrong)
        comparison, _ = compare_steps(a, b)
        sign = "-" if a < b else ""
        what = f"-({big}-{small})" if a < b else f"{big}-{small}"
        header = [comparison[:-1] + f": {what}."]
    value = -_number(out) if sign else _number(out)
    reasoning = "\n".join([*header, *steps, read_digits(out, sign)])
    return question, reasoning, f"{a} {op} {b} = {value}", value


ARITHMETIC_SHARE = 0.75  # of the SFT conversations; the rest are the small chat tasks
OPERAND_DIGITS = (1, 2, 3, 3, 3, 4)  # mostly 3-digit numbers, some shorter and some longer


def _operands(rng: random.Random, digits: tuple[int, ...] = OPERAND_DIGITS) -> tuple[int, int, str]:
    da, db = rng.choice(digits), rng.choice(digits)
    a = rng.randint(10 ** (da - 1) if da > 1 else 0, 10**da - 1)
    b = rng.randint(10 ** (db - 1) if db > 1 else 0, 10**db - 1)
    return a, b, rng.choice("+-")


def _wrong_variant(a: int, b: int, op: str, rng: random.Random) -> tuple[str, str]:
    """A plausible wrong (reasoning, answer): dropped carry/borrow if that changes the result, else off by ten."""
    _, reasoning, _, right = arithmetic_problem(a, b, op)
    _, bad_reasoning, _, bad = arithmetic_problem(a, b, op, wrong=True)
    if bad != right:
        return bad_reasoning, f"{a} {op} {b} = {bad}"
    slip = right + rng.choice([10, -10, 1, -1])
    return reasoning.removesuffix(f": {right}") + f": {slip}", f"{a} {op} {b} = {slip}"


# ---------------------------------------------------------------- non-arithmetic chat tasks


def chat_task(rng: random.Random) -> tuple[str, str, str, str]:
    """(key, question, reasoning, answer) for a small task with an exact answer."""
    kind = rng.randrange(3)
    if kind == 0:
        w = rng.choice(WORDS + NAMES).lower()
        letters = " ".join(w)
        rev = w[::-1]
        return (
            f"rev:{w}",
            f'Spell the word "{w}" backwards.',
            f"The letters are {letters}.\nIn reverse order: {' '.join(rev)}.",
            rev,
        )
    if kind == 1:
        x, y = rng.sample(range(0, 1000), 2)
        reasoning, bigger = compare_steps(x, y)
        return f"cmp:{x},{y}", f"Which is larger, {x} or {y}?", reasoning, str(bigger)
    w = rng.choice(WORDS)
    ch = rng.choice(sorted(set(w)))
    n = w.count(ch)
    return (
        f"cnt:{w}:{ch}",
        f'How many times does the letter "{ch}" appear in "{w}"?',
        f"The letters are {' '.join(w)}.\nThe letter {ch} appears {n} time{'s' if n != 1 else ''}.",
        str(n),
    )


def sft_example(rng: random.Random) -> tuple[str, dict]:
    """(split key, record). About one record in five is a thinking-off sample."""
    think = rng.random() >= 0.2
    if rng.random() < ARITHMETIC_SHARE:
        a, b, op = _operands(rng)
        q, reasoning, answer, _ = arithmetic_problem(a, b, op)
        key = f"{a}{op}{b}"
    else:
        key, q, reasoning, answer = chat_task(rng)
    record = {
        "messages": [
            {"role": "user", "content": q},
            {"role": "assistant", "content": assistant_text(reasoning, answer, think)},
        ],
        "answer": answer,
    }
    return key, record


def dpo_example(rng: random.Random) -> tuple[str, dict]:
    a, b, op = _operands(rng)
    q, reasoning, answer, _ = arithmetic_problem(a, b, op)
    bad_reasoning, bad_answer = _wrong_variant(a, b, op, rng)
    record = {
        "prompt": [{"role": "user", "content": q}],
        "chosen": assistant_text(reasoning, answer, True),
        "rejected": assistant_text(bad_reasoning, bad_answer, True),
        "answer": answer,
    }
    return f"{a}{op}{b}", record


RL_OPERAND_DIGITS = (1, 2, 3, 4)  # RL prompts: every length as often, so the rarer ones are practised too
RL_ARITHMETIC_SHARE = 0.9


def rl_example(rng: random.Random) -> tuple[str, dict]:
    """A prompt with its verifiable answer for the RL stage (no assistant turn)."""
    if rng.random() < RL_ARITHMETIC_SHARE:
        a, b, op = _operands(rng, RL_OPERAND_DIGITS)
        q, _, answer, _ = arithmetic_problem(a, b, op)
        key = f"{a}{op}{b}"
    else:
        key, q, _, answer = chat_task(rng)
    return key, {"messages": [{"role": "user", "content": q}], "answer": answer}


# ---------------------------------------------------------------- splits and files


def _split(make: Callable[[random.Random], tuple[str, dict]], rng: random.Random, n_train: int, n_eval: int):
    """Draw records until both splits are full; a key seen once is never used again (no duplicates)."""
    train, evals, seen = [], [], set()
    attempts = 0
    while len(train) < n_train or len(evals) < n_eval:
        attempts += 1
        if attempts > 50 * (n_train + n_eval) + 1000:
            raise RuntimeError("synthetic generator ran out of distinct examples; ask for fewer")
        key, rec = make(rng)
        if key in seen:
            continue
        seen.add(key)
        target = evals if _is_eval(key) else train
        limit = n_eval if target is evals else n_train
        if len(target) < limit:
            target.append(rec)
    return train, evals


def generate(
    out_dir: str | Path,
    seed: int = 0,
    pretrain_docs: int = 20000,
    sft: int = 4000,
    dpo: int = 2000,
    rl: int = 2000,
    eval_fraction: float = 0.05,
) -> dict[str, Path]:
    """Write the eight JSONL files (pretrain, sft, dpo, rl; train and eval) into out_dir and return their
    paths by name. Only the RL prompts keep their answers in the training split (the reward needs them)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def n_eval(n: int) -> int:
        return max(1, int(n * eval_fraction))

    pre = lambda r: ((t := pretrain_text(r)), {"text": t})
    splits = {
        "pretrain": _split(pre, random.Random(f"{seed}-pretrain"), pretrain_docs, n_eval(pretrain_docs)),
        "sft": _split(sft_example, random.Random(f"{seed}-sft"), sft, n_eval(sft)),
        "dpo": _split(dpo_example, random.Random(f"{seed}-dpo"), dpo, n_eval(dpo)),
        "rl": _split(rl_example, random.Random(f"{seed}-rl"), rl, n_eval(rl)),
    }
    paths = {}
    for name, (train, evals) in splits.items():
        for split, records in (("train", train), ("eval", evals)):
            path = out / f"{name}_{split}.jsonl"
            tmp = path.with_name(path.name + ".tmp")
            with tmp.open("w") as f:
                for rec in records:
                    if split == "train" and name != "rl":
                        rec = {k: v for k, v in rec.items() if k != "answer"}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            tmp.replace(path)
            paths[f"{name}_{split}"] = path
    return paths
