"""SFT loss masks pinned token by token, packing, truncation."""

import numpy as np
import pytest
import torch

from models import IGNORE_INDEX
from train.data.chat_masks import encode_with_mask
from train.data.finetune import PackedSFTDataset, SFTDataset, build_sft_examples, pack_best_fit, pad_collate
from train.data.records import Conversation

THINK = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<think>\nAdd the ones.\n</think>\n\n2 + 3 = 5"},
]
NO_THINK = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "<think>\n\n</think>\n\nHello!"},
]


def _split(tokenizer, conv):
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    ids, mask = encode_with_mask(tokenizer, text)
    return ids, mask


def _decode_runs(tokenizer, ids, mask):
    """The trained and untrained stretches, in order, as text."""
    runs, cur, cur_m = [], [], None
    for i, m in zip(ids, mask):
        if cur and m != cur_m:
            runs.append((cur_m, tokenizer.decode(cur)))
            cur = []
        cur.append(i)
        cur_m = m
    runs.append((cur_m, tokenizer.decode(cur)))
    return runs


def test_mask_boundary_with_thinking(tokenizer):
    ids, mask = _split(tokenizer, THINK)
    assert _decode_runs(tokenizer, ids, mask) == [
        (False, "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "<think>\nAdd the ones.\n</think>\n\n2 + 3 = 5<|im_end|>"),
        (False, "\n"),
    ]
    first = mask.index(True)
    assert tokenizer.convert_ids_to_tokens(ids[first]) == "<think>"  # the first trained token
    assert tokenizer.convert_ids_to_tokens(ids[first - 1]) == "Ċ"  # the newline after "assistant"
    last = len(mask) - 1 - mask[::-1].index(True)
    assert ids[last] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_mask_boundary_without_thinking_and_system(tokenizer):
    ids, mask = _split(tokenizer, NO_THINK)
    assert _decode_runs(tokenizer, ids, mask) == [
        (
            False,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        ),
        (True, "Hello!<|im_end|>"),
        (False, "\n"),
    ]
    # the empty think block is the prompt that `--no-think` pre-fills: generation continues from there
    prefilled = tokenizer.apply_chat_template(
        NO_THINK[:-1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    untrained_prefix = _decode_runs(tokenizer, ids, mask)[0][1]
    assert untrained_prefix == prefilled


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    conv = THINK + [{"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]
    ids, mask = _split(tokenizer, conv)
    trained = [text for m, text in _decode_runs(tokenizer, ids, mask) if m]
    # the first turn is rendered without its reasoning (it is not the last turn any more)
    assert trained == ["2 + 3 = 5<|im_end|>", "8<|im_end|>"]


def test_targets_are_the_next_trained_token(tokenizer):
    examples, dropped = build_sft_examples(tokenizer, [Conversation(THINK)], max_len=512)
    row = SFTDataset(examples)[0]
    ids, mask = examples[0].ids, examples[0].trained
    assert dropped == 0 and torch.equal(row["input_ids"], torch.tensor(ids[:-1], dtype=torch.long))
    for t in range(len(ids) - 1):
        assert row["targets"][t].item() == (ids[t + 1] if mask[t + 1] else IGNORE_INDEX)


def test_padding_is_never_a_target(tokenizer):
    examples, _ = build_sft_examples(tokenizer, [Conversation(THINK), Conversation(NO_THINK)], max_len=512)
    ds = SFTDataset(examples)
    batch = pad_collate(6)([ds[0], ds[1]])
    short = min(len(ds[0]["input_ids"]), len(ds[1]["input_ids"]))
    i = 0 if len(ds[0]["input_ids"]) == short else 1
    assert (batch["input_ids"][i, short:] == 6).all() and (batch["targets"][i, short:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("strategy", ["next-fit", "best-fit"])
def test_packing_keeps_conversations_apart(tokenizer, strategy):
    examples, _ = build_sft_examples(tokenizer, [Conversation(THINK), Conversation(NO_THINK)], max_len=512)
    ds = PackedSFTDataset(examples, seq_len=sum(len(e.ids) for e in examples) + 9, pad_id=6, strategy=strategy)
    assert len(ds) == 1
    first, second = ds.row_examples(0)  # next-fit: corpus order; best-fit decreasing: the longer first
    want = examples if strategy == "next-fit" else sorted(examples, key=lambda e: -len(e.ids))
    assert [id(first), id(second)] == [id(e) for e in want]
    n0, n1 = len(first.ids), len(second.ids)
    row = ds[0]
    seg, pos, tgt = row["segment_ids"], row["position_ids"], row["targets"]
    assert seg[:n0].eq(0).all() and seg[n0 : n0 + n1].eq(1).all() and seg[n0 + n1 :].eq(2).all()
    assert pos[n0].item() == 0 and pos[n0 + n1 - 1].item() == n1 - 1
    assert tgt[n0 - 1].item() == IGNORE_INDEX  # conversation 0's last token does not predict conversation 1
    assert tgt[n0 + n1 - 1 :].eq(IGNORE_INDEX).all()  # nor does anything predict padding
    single = SFTDataset([first, second])
    assert torch.equal(tgt[: n0 - 1], single[0]["targets"])
    assert torch.equal(tgt[n0 : n0 + n1 - 1], single[1]["targets"])


def _next_fit_rows(lengths, capacity):
    rows, used = 0, capacity
    for n in lengths:
        if used + n > capacity:
            rows, used = rows + 1, 0
        used += n
    return rows


def test_best_fit_packing_places_every_item_once_within_capacity():
    assert [list(map(int, o)) for o in _rows([6, 5, 4, 3, 2], 10)] == [[0, 2], [1, 3, 4]]  # next-fit needs 3 rows
    rng = np.random.default_rng(0)
    for lengths in (rng.integers(1, 290, 2000), rng.choice([30, 60, 150, 250], 3000), np.full(7, 289), []):
        rows = _rows(lengths, 289)
        placed = np.concatenate(rows) if rows else np.array([], dtype=np.int64)
        assert sorted(placed.tolist()) == list(range(len(lengths)))
        assert all(np.asarray(lengths)[r].sum() <= 289 for r in rows)
        assert len(rows) <= _next_fit_rows(lengths, 289)
    skewed = rng.choice([30, 120, 240], 5000, p=[0.3, 0.4, 0.3])  # like the demo's 1- to 4-digit problems
    assert len(_rows(skewed, 289)) < 0.9 * _next_fit_rows(skewed, 289)
    with pytest.raises(ValueError, match="lengths must be in"):
        pack_best_fit([10, 300], 289)


def _rows(lengths, capacity):
    order, starts = pack_best_fit(lengths, capacity)
    return [order[starts[r] : starts[r + 1]] for r in range(len(starts) - 1)]


def test_truncation_keeps_the_start_and_drops_unlearnable(tokenizer):
    long_answer = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "word " * 200}]
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "a"}]
    convs = [Conversation(c) for c in (long_answer, long_prompt, THINK)]
    examples, dropped = build_sft_examples(tokenizer, convs, max_len=64)
    assert dropped == 1 and len(examples) == 2
    assert len(examples[0].ids) == 65 and examples[0].trained[-1]


def test_sft_pack_strategy_plans_fewer_rows_and_resume_refuses_another(
    tmp_path, sft_model_dir, synthetic_dir, capsys, cli_error
):
    from train.sft import main as sft_main

    def argv(out, strategy):
        return ["--init", str(sft_model_dir), "--data", str(synthetic_dir / "sft_train.jsonl"), "--out", str(out)] + [
            "--pack", "--pack-strategy", strategy, "--seq-len", "256", "--batch-size", "4", "--max-steps", "2",
            "--eval-every", "0", "--save-every", "1", "--no-progress",
        ]  # fmt: skip

    rows = {}
    for strategy in ("next-fit", "best-fit"):
        sft_main(argv(tmp_path / strategy, strategy) + ["--stop-after", "1"])
        rows[strategy] = int(capsys.readouterr().out.split(" rows,")[0].rsplit(" ", 1)[1])
    assert rows["best-fit"] < rows["next-fit"]
    cli_error(["sft"] + argv(tmp_path / "best-fit", "next-fit") + ["--resume"], "was trained on other data")
