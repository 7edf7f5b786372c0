"""Think mode: the streaming parser, the chat display, generation options."""

import io

import pytest
import torch

from models.think import ThinkParser, split_reasoning

CASES = [
    (
        "<think>\nones: 7 + 6 = 13\nSo 933.\n</think>\n\n347 + 586 = 933",
        False,
        ("ones: 7 + 6 = 13\nSo 933.", "347 + 586 = 933"),
    ),
    ("<think>\n\n</think>\n\nhello there", False, ("", "hello there")),
    ("just an answer", False, ("", "just an answer")),
    ("<think>\nunfinished thought  ", False, ("unfinished thought", "")),  # no closing tag
    ("already thinking\n</think>\n\nans", True, ("already thinking", "ans")),  # prompt opened <think>
    ("<think>a < b and c</thin k> d</think>e", False, ("a < b and c</thin k> d", "e")),  # look-alikes
]


@pytest.mark.parametrize("text, in_reasoning, want", CASES)
def test_parser_whole_and_streamed_at_every_split(text, in_reasoning, want):
    assert split_reasoning(text, in_reasoning) == want
    for size in (1, 2, 3, 5, 7):  # tags split across chunks in every possible place
        p = ThinkParser(in_reasoning)
        pieces = []
        for i in range(0, len(text), size):
            pieces += p.feed(text[i : i + size])
        pieces += p.finish()
        assert (p.reasoning, p.answer) == want, size
        assert "".join(t for k, t in pieces if k == "reasoning") == want[0]
        assert "".join(t for k, t in pieces if k == "answer") == want[1]
        kinds = [k for k, _ in pieces]
        assert kinds == sorted(kinds, key=lambda k: k == "answer")  # all reasoning comes first


def test_display_plain_text_headings():
    from train.chat import Display

    out = io.StringIO()
    d = Display(out)
    for kind, text in [("reasoning", "step 1"), ("reasoning", " step 2"), ("answer", "42")]:
        d.piece(kind, text)
    d.end()
    assert out.getvalue() == "[thinking]\nstep 1 step 2\n\n[answer]\n42\n"


def test_chat_session_streams_reasoning_and_answer(tmp_path, tokenizer_dir, monkeypatch):
    """The real tokenizer and detokenizer, the parser and the display, with the model's tokens scripted."""
    from models import DenseLM, make_config, save_model
    from train import chat as chat_mod
    from train.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    save_model(DenseLM(make_config("dense", "micro", vocab_size=len(tok))), tmp_path / "ck", tokenizer_dir)
    reply = "<think>\nAdd 2 and 3.\n</think>\n\n2 + 3 = 5"
    scripted = tok.encode(reply, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    seen_prompts = []

    def fake_generate(model, prompts, *a, on_token=None, **k):
        seen_prompts.append(tok.decode(prompts[0]))
        for t in scripted:
            on_token(0, t)
        return [scripted]

    monkeypatch.setattr(chat_mod, "generate", fake_generate)
    session = chat_mod.ChatSession(tmp_path / "ck", think=True, temperature=0.0)
    out = io.StringIO()
    reasoning, answer = session.reply("What is 2 + 3?", chat_mod.Display(out))
    assert (reasoning, answer) == ("Add 2 and 3.", "2 + 3 = 5")
    assert out.getvalue() == "[thinking]\nAdd 2 and 3.\n\n[answer]\n2 + 3 = 5\n"
    assert seen_prompts[0].endswith("<|im_start|>assistant\n")
    session.think = False
    session.reply("And again?", chat_mod.Display(io.StringIO()))
    assert seen_prompts[1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "2 + 3 = 5<|im_end|>" in seen_prompts[1] and "Add 2 and 3." not in seen_prompts[1]  # history


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    from models.generate import _penalize_repeats

    logits = torch.randn(2, 50)
    seen = torch.randint(0, 50, (2, 12))
    want = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    torch.testing.assert_close(_penalize_repeats(logits, seen, 1.3), want)


def test_top_k_top_p_keep_only_allowed_tokens():
    from models.generate import _filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    assert torch.isfinite(_filter_logits(logits, 2, None)).tolist() == [[True, True, False, False, False]]
    assert torch.isfinite(_filter_logits(logits, None, 0.85)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(_filter_logits(logits, None, 0.5)).tolist() == [[True, False, False, False, False]]


def test_sampled_generation_with_penalty_matches_transformers_greedy(tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from models import DenseLM, export_hf, make_config, save_model
    from models.generate import generate

    torch.manual_seed(0)
    model = DenseLM(make_config("dense", "micro", vocab_size=300)).eval()
    save_model(model, tmp_path / "ck", tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(str(export_hf(tmp_path / "ck", tmp_path / "hf"))).eval()
    prompt = [5, 9, 12, 40, 41]
    ours = generate(model, [prompt], 15, repetition_penalty=1.5)[0]
    cfg = GenerationConfig(max_new_tokens=15, do_sample=False, repetition_penalty=1.5, pad_token_id=0)
    theirs = hf.generate(torch.tensor([prompt]), generation_config=cfg)[0, len(prompt) :].tolist()
    assert ours == theirs
    streamed = []
    generate(model, [prompt], 15, repetition_penalty=1.5, on_token=lambda i, t: streamed.append(t))
    assert streamed == ours


def test_stop_token_ends_each_prompt_of_a_batch():
    from models import DenseLM, make_config
    from models.generate import generate

    torch.manual_seed(1)
    model = DenseLM(make_config("dense", "micro", vocab_size=64)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    free = generate(model, prompts, 10)
    stops = [free[0][3], free[1][2]]  # each prompt's free run holds a stop token by the 4th new token
    out = generate(model, prompts, 10, stop_ids=stops)
    for i in range(2):
        first = min(j for j, t in enumerate(free[i]) if t in stops)
        assert first <= 3 and out[i] == free[i][: first + 1]
