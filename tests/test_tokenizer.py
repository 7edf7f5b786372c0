import random
import unicodedata

import pytest

from train.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

SAMPLES = [
    "Hello  world\n\n\tindented\r\nwindows line",
    "Ünïcödé: naïve café, Straße, ½ ∑ √ ≠ 😀👍🏽 漢字かなカナ 한국어 العربية",
    "   leading and trailing spaces   ",
    "<|im_start|>user\nhi<|im_end|>\n<think>\nx\n</think>\n\nanswer<|endoftext|>",
    "",
    "1234567890 + 0.5e-3 = ?",
]


def test_special_tokens_are_single_ids_in_order(tokenizer):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(t) == i
        assert tokenizer.encode(t, add_special_tokens=False) == [i]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_round_trip_random_unicode(tokenizer):
    """Any text comes back exactly in its NFC form (the tokenizer normalises to NFC first, as Qwen2's does,
    so that its transformers export encodes alike: tests/test_reliability.py); NFC text comes back as is."""
    rng = random.Random(0)
    changed = 0
    for _ in range(200):
        text = "".join(
            chr(
                rng.choice(
                    [
                        rng.randint(0x20, 0x7E),
                        rng.randint(0xA0, 0x2FFF),
                        rng.randint(0x1F300, 0x1FAFF),
                        0x0A,
                        0x09,
                        0x20,
                    ]
                )
            )
            for _ in range(rng.randint(1, 40))
        )
        nfc = unicodedata.normalize("NFC", text)
        changed += nfc != text
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == nfc
        assert tokenizer.decode(tokenizer.encode(nfc, add_special_tokens=False)) == nfc
    assert changed > 0  # the draw holds text that NFC changes


def test_digits_are_single_tokens(tokenizer):
    toks = tokenizer.convert_ids_to_tokens(tokenizer.encode("347 + 5861 = 6208", add_special_tokens=False))
    digit_toks = [t for t in toks if any(c.isdigit() for c in t)]
    assert digit_toks and all(len(t) == 1 for t in digit_toks), toks
    assert "".join(digit_toks) == "34758616208"


def test_think_tags_survive_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant\n<think>\nr\n</think>\n\na<|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nr\n</think>\n\na"


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>\n2 plus 2 is 4.\n</think>\n\n4"},
    {"role": "user", "content": "And 3 + 3?"},
]


def test_chat_template_thinking_switch(tokenizer):
    on = tokenizer.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    off = tokenizer.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    head = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert on == head  # thinking on: the model writes its own <think> block
    assert off == head + "<think>\n\n</think>\n\n"


def test_chat_template_keeps_reasoning_of_the_answered_turn_only(tokenizer):
    done = CONV + [{"role": "assistant", "content": "6", "reasoning_content": "3 plus 3 is 6."}]
    text = tokenizer.apply_chat_template(done, tokenize=False)
    # the earlier turn's reasoning is dropped (Qwen3 convention), the last one's is kept
    assert "2 plus 2" not in text
    assert text.endswith("<|im_start|>assistant\n<think>\n3 plus 3 is 6.\n</think>\n\n6<|im_end|>\n")
    kept = tokenizer.apply_chat_template(done, tokenize=False, keep_past_thinking=True)
    assert "<|im_start|>assistant\n<think>\n2 plus 2 is 4.\n</think>\n\n4<|im_end|>" in kept


def test_no_think_training_sample_matches_the_no_think_prompt(tokenizer):
    """An SFT sample with empty reasoning renders exactly what inference with thinking off pre-fills."""
    msgs = [{"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    full = tokenizer.apply_chat_template(
        msgs + [{"role": "assistant", "content": "<think>\n\n</think>\n\nhello"}], tokenize=False
    )
    assert full == prompt + "hello<|im_end|>\n"


def test_autotokenizer_loads_the_saved_directory(tmp_path, synthetic_dir):
    stats = train_tokenizer([synthetic_dir / "pretrain_train.jsonl"], 512, tmp_path / "tok", quiet=True)
    assert stats["bytes"] > 100_000
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == stats["vocab_size"] <= 512
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert load_tokenizer(tmp_path / "tok").encode("<|im_end|>", add_special_tokens=False) == [2]
