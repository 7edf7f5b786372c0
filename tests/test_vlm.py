"""The VLM: transformers LLaVA parity from the same weights, image tokens, pixel shuffle against a
loop, image preprocessing errors, data with images, SFT masks, freezing parts, chat with an image."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import VLM, VLMConfig, export_hf, load_pretrained, make_config, save_model
from models.vision import pixel_shuffle
from train.data.finetune import build_sft_examples
from train.data.formats import load_sft
from train.data.images import load_image
from train.data.synthetic_images import generate_images
from train.errors import DataError, UserError
from train.finetune import freeze_except

BIN = Path(sys.executable).parent


def _vlm(seed=0, **overrides) -> VLM:
    torch.manual_seed(seed)
    text = make_config("dense", "micro", vocab_size=97, tie_word_embeddings=False).to_dict()
    model = VLM(VLMConfig(text_config=text, vision_num_layers=2, **overrides)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ids(model, n_images=2):
    c = model.config
    rows = [[1, 7] + [c.image_token_id] * c.image_tokens + [9, 10, 11, 12] for _ in range(n_images)]
    return torch.tensor(rows)


def test_logits_match_transformers_llava(tmp_path, tokenizer_dir):
    from transformers import AutoModelForImageTextToText

    from models.checkpoint import copy_tokenizer_files

    model = _vlm()
    save_model(model, tmp_path / "ours")
    copy_tokenizer_files(tokenizer_dir, tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    assert type(hf).__name__ == "LlavaForConditionalGeneration"
    ids, pixels = _ids(model), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours, theirs = model(ids, pixel_values=pixels).logits, hf(input_ids=ids, pixel_values=pixels).logits
    assert theirs.abs().max() > 0.5
    assert (ours - theirs).abs().max().item() < 1e-5
    back = load_pretrained(tmp_path / "hf")
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k


def test_pixel_shuffle_against_a_loop_and_no_llava_export(tmp_path):
    x = torch.randn(2, 16, 5)  # a 4 x 4 grid of 5-dim patch features
    out = pixel_shuffle(x, 2)
    grid = x.view(2, 4, 4, 5)
    for n in range(2):
        for i in range(2):
            for j in range(2):
                block = [grid[n, 2 * i + a, 2 * j + b] for a in range(2) for b in range(2)]
                assert torch.equal(out[n, i * 2 + j], torch.cat(block))
    model = _vlm(pixel_shuffle=2)
    assert model.config.image_tokens == 4 and model.image_features(torch.randn(1, 3, 32, 32)).shape == (1, 4, 64)
    save_model(model, tmp_path / "ps")
    from models import CheckpointError

    with pytest.raises(CheckpointError, match="pixel_shuffle"):
        export_hf(tmp_path / "ps", tmp_path / "hf")


def test_image_token_count_must_match_the_images():
    model = _vlm()
    ids = _ids(model, 2)
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids)


def test_image_preprocessing_and_its_errors(tmp_path):
    from PIL import Image

    Image.new("RGBA", (20, 10), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent
    x = load_image(tmp_path / "clear.png", 32)
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.ones_like(x))  # composited over white
    Image.new("L", (8, 8), 0).save(tmp_path / "gray.png")
    assert torch.allclose(load_image(tmp_path / "gray.png", 16), -torch.ones(3, 16, 16))
    Image.new("CMYK", (8, 8)).save(tmp_path / "print.jpg")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (2, 2)).save(tmp_path / "tiny.png")
    for name, needle in (
        ("print.jpg", "mode 'CMYK'"),
        ("text.png", "cannot read"),
        ("tiny.png", "smaller"),
        ("missing.png", "not found"),
    ):
        with pytest.raises(UserError, match=needle) as e:
            load_image(tmp_path / name, 32)
        assert name in str(e.value)


def test_records_with_images_are_checked(tmp_path):
    paths = generate_images(tmp_path, train=4, held_out=2, size=32)
    convs = load_sft(paths["vlm_sft_train"])
    assert len(convs[0].images) == 1 and convs[0].images[0].exists()
    bad = tmp_path / "bad.jsonl"
    rec = json.loads(paths["vlm_sft_train"].read_text().splitlines()[0])
    bad.write_text(json.dumps({**rec, "images": []}) + "\n" + json.dumps({**rec, "images": ["nope.png"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: 1 <\|image\|> placeholder\(s\) but 0 image"):
        load_sft(bad)
    bad.write_text(json.dumps({**rec, "images": ["nope.png"]}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: images\\[0\\]: no such file"):
        load_sft(bad)


def test_image_tokens_are_expanded_and_never_trained(tmp_path, tokenizer):
    paths = generate_images(tmp_path, train=3, held_out=1)
    convs = load_sft(paths["vlm_sft_train"])
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    examples, dropped = build_sft_examples(tokenizer, convs, 200, image_tokens=16)
    assert dropped == 0
    for e in examples:
        img = e.ids == image_id
        assert img.sum() == 16 and not e.trained[img].any()
        assert e.trained.any()
    with pytest.raises(UserError, match="not a VLM"):
        build_sft_examples(tokenizer, convs, 200, image_tokens=0)
    # an example whose image tokens would be cut by the length limit is dropped, not half-imaged
    _, dropped = build_sft_examples(tokenizer, convs, 10, image_tokens=16)
    assert dropped == len(convs)


def test_freeze_except_trains_only_the_named_parts():
    model = _vlm()
    n = freeze_except(model, "projector")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("multi_modal_projector.") for name in trainable)
    assert n == sum(p.numel() for p in model.multi_modal_projector.parameters())
    with pytest.raises(UserError, match="unknown part"):
        freeze_except(model, "eyes")


def test_chat_answers_about_an_image(tmp_path, tokenizer_dir, tokenizer):
    from models.checkpoint import copy_tokenizer_files

    text = make_config("dense", "micro", vocab_size=len(tokenizer)).to_dict()
    model = VLM(VLMConfig(text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<|image|>")))
    save_model(model, tmp_path / "vlm", tokenizer_dir)
    copy_tokenizer_files(tokenizer_dir, tmp_path / "vlm")
    paths = generate_images(tmp_path / "img", train=1, held_out=1)
    image = next((tmp_path / "img" / "images").glob("*.png"))
    r = subprocess.run(
        [
            str(BIN / "llm-scratch"),
            "chat",
            "--checkpoint",
            str(tmp_path / "vlm"),
            "--image",
            str(image),
            "--prompt",
            "What color is the shape?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert paths
    r = subprocess.run(
        [
            str(BIN / "llm-scratch"),
            "chat",
            "--checkpoint",
            str(tmp_path / "vlm"),
            "--image",
            str(tmp_path / "missing.png"),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "missing.png: image file not found" in r.stderr


def test_generation_never_writes_an_image_placeholder():
    """A VLM that would rather write <|image|> than anything else: generation (one call, or the server's
    batch decoder) picks its next best token instead; a placeholder it wrote would have no image to fill
    it, and the next forward would refuse it (RL sampling from the VLM once did exactly that)."""
    from models.batching import BatchDecoder, Request
    from models.generate import generate

    model = _vlm()
    image_id = model.config.image_token_id
    model.language_model.lm_head.register_forward_hook(
        lambda module, args, out: out.index_add(-1, torch.tensor([image_id]), torch.full((*out.shape[:-1], 1), 50.0))
    )
    prompt, pixels = _ids(model, 1)[0].tolist(), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model(torch.tensor([prompt]), pixel_values=pixels).logits[0, -1].argmax() == image_id
    for temperature in (0.0, 1.0):
        out = generate(model, [prompt], 6, temperature=temperature, pixel_values=pixels)[0]
        assert len(out) == 6 and image_id not in out
    request = Request(prompt, 6, pixel_values=pixels)
    BatchDecoder(model, slots=2).run([request])
    assert len(request.tokens) == 6 and image_id not in request.tokens
