import random

import pytest

from train.data import synthetic
from train.data.formats import load_dpo, load_sft, read_jsonl


def test_generation_is_deterministic(tmp_path):
    a = synthetic.generate(tmp_path / "a", seed=3, pretrain_docs=200, sft=50, dpo=20)
    b = synthetic.generate(tmp_path / "b", seed=3, pretrain_docs=200, sft=50, dpo=20)
    c = synthetic.generate(tmp_path / "c", seed=4, pretrain_docs=200, sft=50, dpo=20)
    for name in a:
        assert a[name].read_bytes() == b[name].read_bytes()
    assert a["sft_train"].read_bytes() != c["sft_train"].read_bytes()


def _question(rec):
    msgs = rec["messages"] if "messages" in rec else rec["prompt"]
    return next(m["content"] for m in msgs if m["role"] == "user")


def test_splits_are_disjoint_and_eval_has_answers(synthetic_dir):
    for task in ("sft", "dpo"):
        train = [r for _, r in read_jsonl(synthetic_dir / f"{task}_train.jsonl")]
        evals = [r for _, r in read_jsonl(synthetic_dir / f"{task}_eval.jsonl")]
        assert evals and all("answer" in r for r in evals)
        assert not ({_question(r) for r in train} & {_question(r) for r in evals})
    pre_train = {r["text"] for _, r in read_jsonl(synthetic_dir / "pretrain_train.jsonl")}
    pre_eval = {r["text"] for _, r in read_jsonl(synthetic_dir / "pretrain_eval.jsonl")}
    assert pre_eval and not (pre_train & pre_eval)


def test_records_load_with_the_user_data_readers(synthetic_dir):
    convs = load_sft(synthetic_dir / "sft_train.jsonl")
    assert len(convs) == 300
    pairs = load_dpo(synthetic_dir / "dpo_train.jsonl")
    assert all(p.chosen != p.rejected for p in pairs)


@pytest.mark.parametrize("seed", range(5))
def test_column_arithmetic_is_right_and_the_wrong_variant_is_wrong(seed):
    rng = random.Random(seed)
    for _ in range(300):
        a, b = rng.randint(0, 99999), rng.randint(0, 99999)
        op = rng.choice("+-")
        q, reasoning, answer, value = synthetic.arithmetic_problem(a, b, op)
        assert value == (a + b if op == "+" else a - b)
        assert answer == f"{a} {op} {b} = {value}" and reasoning.endswith(f": {value}")
        bad_reasoning, bad_answer = synthetic._wrong_variant(a, b, op, rng)
        assert bad_answer != answer and bad_reasoning.endswith(": " + bad_answer.split(" = ")[1])


def test_reasoning_shows_carries_and_borrows():
    _, r, _, _ = synthetic.arithmetic_problem(347, 586, "+")
    assert r == (
        "347: hundreds 3, tens 4, ones 7.\n"
        "586: hundreds 5, tens 8, ones 6.\n"
        "ones: 7+6=13, write 3, carry 1\n"
        "tens: 4+8=12, 12+1=13, write 3, carry 1\n"
        "hundreds: 3+5=8, 8+1=9, write 9\n"
        "hundreds 9, tens 3, ones 3: 933"
    )
    _, r, _, v = synthetic.arithmetic_problem(1203, 587, "-")
    assert v == 616 and "ones: 3,7: 3<7, borrow: 13-7=6" in r
    assert "tens: 0,8: 0-1=-1, -1<8, borrow: 9-8=1" in r
    assert r.startswith(
        "1203: thousands 1, hundreds 2, tens 0, ones 3.\n"
        "587: thousands 0, hundreds 5, tens 8, ones 7.\n"
        "Compare: thousands 1>0, so 1203 is larger: 1203-587.\n"
    )
    _, r, _, v = synthetic.arithmetic_problem(481, 487, "-")
    assert v == -6 and r.endswith("hundreds 0, tens 0, ones 6: -6")
    assert "Compare: hundreds 4=4, tens 8=8, ones 1<7, so 487 is larger: -(487-481).\n" in r
    _, r, _, v = synthetic.arithmetic_problem(95, 7, "+")
    assert v == 102 and r.endswith("hundreds: write the carry 1\nhundreds 1, tens 0, ones 2: 102")


@pytest.mark.parametrize("a,b", [(5, 5), (0, 7), (120, 102), (999, 1000), (4567, 4576)])
def test_compare_steps_names_the_larger(a, b):
    text, larger = synthetic.compare_steps(a, b)
    assert larger == max(a, b)
    assert text.endswith("so they are equal." if a == b else f"so {larger} is larger.")


def test_sft_assistant_turns_reason_then_answer(synthetic_dir):
    for _, rec in read_jsonl(synthetic_dir / "sft_eval.jsonl"):
        content = rec["messages"][-1]["content"]
        assert content.startswith("<think>\n") and content.endswith("</think>\n\n" + rec["answer"])
    contents = [c.messages[-1]["content"] for c in load_sft(synthetic_dir / "sft_train.jsonl")]
    empty = sum(c.startswith("<think>\n\n</think>\n\n") for c in contents)
    assert 0.1 < empty / len(contents) < 0.3  # about one in five answers with thinking off
