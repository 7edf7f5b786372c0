"""Nothing lost, nothing executed, nothing half-done: bad inputs, kills and races tried as a careless or
hostile user would (docs/reliability.md lists each case and the test here that holds it)."""

import json
import math
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from models import CheckpointError, DenseLM, export_hf, load_pretrained, make_config, save_model
from train.errors import DataError, UserError


def _pretrain_args(synthetic_dir, tokenizer_dir, out, *extra):
    return [
        "pretrain",
        "--data",
        str(synthetic_dir / "pretrain_train.jsonl"),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(out),
        "--preset",
        "micro",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "--no-progress",
        *extra,
    ]


def _run(argv):
    from train.cli import main

    main(argv)


def _micro_checkpoint(tmp_path, tokenizer_dir, name="ck") -> Path:
    from train.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = DenseLM(make_config("dense", "micro", vocab_size=len(load_tokenizer(tokenizer_dir))))
    return save_model(model, tmp_path / name, tokenizer_dir)


# ---------------------------------------------------------------- 1. the demo deletes nothing of the user's


def test_demo_refuses_a_directory_it_did_not_write(tmp_path):
    from train.demo import claim_demo_dir

    victim = tmp_path / "runs"
    (victim / "sft").mkdir(parents=True)
    (victim / "sft" / "mine.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty and not an earlier demo output"):
        claim_demo_dir(victim)
    assert (victim / "sft" / "mine.txt").read_text() == "precious"


def test_demo_replaces_only_what_an_earlier_demo_wrote(tmp_path):
    from train.demo import claim_demo_dir

    out = tmp_path / "demo"
    owned = claim_demo_dir(out)  # a new directory: claimed, with an empty manifest
    (out / "sft").mkdir()
    (out / "sft" / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine, beside the demo's entries")
    owned.wrote(["sft"])
    (out / "sft" / "mine.txt").write_text("put here later by the user")
    with pytest.raises(UserError, match="mine.txt: in the way of the demo and not written by it"):
        claim_demo_dir(out)
    assert (out / "sft" / "metrics.jsonl").exists() and (out / "sft" / "mine.txt").exists()
    (out / "sft" / "mine.txt").unlink()
    claim_demo_dir(out)
    assert not (out / "sft").exists() and (out / "notes.txt").read_text().startswith("mine")


def test_data_command_overwrites_only_its_own_files(tmp_path, cli_error):
    out = tmp_path / "data"
    out.mkdir()
    (out / "sft_train.jsonl").write_text('{"messages": "my own data"}\n')
    cli_error(["data", "--out", str(out), "--pretrain-docs", "20", "--sft", "5", "--dpo", "5"], "sft_train.jsonl")
    assert "my own data" in (out / "sft_train.jsonl").read_text()
    (out / "sft_train.jsonl").unlink()
    _run(["data", "--out", str(out), "--pretrain-docs", "20", "--sft", "5", "--dpo", "5"])
    first = (out / "sft_train.jsonl").read_text()
    _run(["data", "--out", str(out), "--pretrain-docs", "20", "--sft", "5", "--dpo", "5"])  # its own: replaced
    assert (out / "sft_train.jsonl").read_text() == first


# ---------------------------------------------------------------- 2. loading never runs a pickle


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_checkpoint(tmp_path, tokenizer_dir) -> tuple[Path, Path]:
    ck = _micro_checkpoint(tmp_path, tokenizer_dir, "evil")
    (ck / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (ck / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Evil(marker)))
    return ck, marker


def test_a_checkpoint_with_a_crafted_pickle_runs_no_code(tmp_path, tokenizer_dir, cli_error):
    ck, marker = _evil_checkpoint(tmp_path, tokenizer_dir)
    cli_error(["sample", "--checkpoint", str(ck), "--prompt", "hi"], "--consolidate-zero")
    cli_error(["chat", "--checkpoint", str(ck), "--prompt", "hi"], "only DeepSpeed ZeRO shards")
    cli_error(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "hf")], "can run code")
    cli_error(["vlm-init", "--llm", str(ck), "--out", str(tmp_path / "v")], "only DeepSpeed ZeRO shards")
    with pytest.raises(CheckpointError):
        load_pretrained(ck)
    assert not marker.exists()


# ---------------------------------------------------------------- 3 and 6. a run's directory


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path, synthetic_dir, tokenizer_dir, cli_error):
    from train.outputs import RunLock

    out = tmp_path / "run"
    lock = RunLock(out, False, ())
    try:
        err = cli_error(_pretrain_args(synthetic_dir, tokenizer_dir, out, "--max-steps", "1"), "in use by another run")
        assert f"pid {os.getpid()}" in err
    finally:
        lock.release()
    assert not (out / "metrics.jsonl").exists()


def test_a_stale_lock_from_a_dead_process_is_taken_over(tmp_path, synthetic_dir, tokenizer_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text("999999999\n")  # a run that died: the OS released its lock
    _run(_pretrain_args(synthetic_dir, tokenizer_dir, out, "--max-steps", "1"))
    assert (out / "latest").exists() and (out / "run.lock").read_text().strip() == str(os.getpid())


def test_a_run_refuses_an_unrelated_directory_and_symlinks(tmp_path, synthetic_dir, tokenizer_dir, cli_error):
    other = tmp_path / "photos"
    (other / "checkpoints" / "step_0000001").mkdir(parents=True)
    (other / "metrics.jsonl").write_text("my notes\n")
    cli_error(_pretrain_args(synthetic_dir, tokenizer_dir, other, "--max-steps", "1"), "holds no run of this program")
    assert (other / "metrics.jsonl").read_text() == "my notes\n" and (other / "checkpoints" / "step_0000001").is_dir()

    out = tmp_path / "run"
    _run(_pretrain_args(synthetic_dir, tokenizer_dir, out, "--max-steps", "1", "--stop-after", "1"))
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(target)
    cli_error(_pretrain_args(synthetic_dir, tokenizer_dir, out, "--max-steps", "2", "--resume"), "symbolic link")
    assert target.read_text() == "keep"


# ---------------------------------------------------------------- 4. divergence


def test_divergence_stops_without_saving_non_finite_weights(tmp_path, synthetic_dir, tokenizer_dir, cli_error):
    out = tmp_path / "run"
    args = _pretrain_args(synthetic_dir, tokenizer_dir, out, "--max-steps", "8", "--lr", "1e30", "--save-every", "1")
    cli_error(args + ["--keep-checkpoints", "2", "--warmup-steps", "0"], "training diverged; stopped without saving")
    from safetensors.torch import load_file

    ckpts = sorted((out / "checkpoints").glob("step_*"))
    for ck in ckpts:  # whatever was saved is finite; nothing non-finite replaced it
        assert all(torch.isfinite(t).all() for t in load_file(str(ck / "model.safetensors")).values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1].get("nonfinite") is True
    if ckpts:
        assert (out / "latest").read_text().strip() == ckpts[-1].name


def test_nonfinite_steps_can_be_skipped(tmp_path, synthetic_dir, tokenizer_dir, monkeypatch):
    import train.pretrain as pretrain

    real = pretrain.lm_loss
    calls = []

    def sometimes_nan(model, batch):
        loss, stats = real(model, batch)
        calls.append(1)
        return (loss * float("nan"), stats) if len(calls) == 2 else (loss, stats)

    monkeypatch.setattr(pretrain, "lm_loss", sometimes_nan)
    out = tmp_path / "run"
    summary = pretrain.main(
        _pretrain_args(synthetic_dir, tokenizer_dir, out, "--max-steps", "3", "--max-nonfinite-steps", "1")[1:]
    )
    assert summary["end_step"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite", False) for r in records] == [False, True, False]
    assert math.isfinite(records[2]["loss"])


# ---------------------------------------------------------------- 5. export writes only where it may


def test_export_refuses_checkpoints_runs_and_foreign_directories(tmp_path, tokenizer_dir, sft_model_dir, cli_error):
    ck = _micro_checkpoint(tmp_path, tokenizer_dir)
    before = (ck / "model.safetensors").read_bytes()
    cli_error(["export", "--checkpoint", str(ck), "--out", str(ck)], "not empty and not an earlier export")
    assert (ck / "model.safetensors").read_bytes() == before
    cli_error(["export", "--checkpoint", str(ck), "--out", str(sft_model_dir)], "not an earlier export")
    assert not (sft_model_dir / "config.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    cli_error(["export", "--checkpoint", str(ck), "--out", str(other)], "not an earlier export")


def test_export_replaces_an_earlier_export_whole(tmp_path, tokenizer_dir):
    ck = _micro_checkpoint(tmp_path, tokenizer_dir)
    out = export_hf(ck, tmp_path / "hf")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"an older sharded export")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with torch.no_grad():
        model = load_pretrained(ck)
        for p in model.parameters():
            p.add_(1.0)
    save_model(model, tmp_path / "ck2", tokenizer_dir)
    export_hf(tmp_path / "ck2", out)
    assert sorted(p.name for p in out.glob("*.safetensors*")) == ["model.safetensors"]
    ids = torch.randint(0, 64, (1, 9))
    assert torch.equal(load_pretrained(out)(ids).logits, model(ids).logits)
    assert not list(tmp_path.glob(".hf.*"))  # no temporary directory left behind


# ---------------------------------------------------------------- 7. images are checked before step 1


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(path: Path) -> None:
    """A tiny file that claims 30000 x 30000 pixels (more than Pillow's decompression-bomb limit)."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("case", ["not_an_image", "truncated", "cmyk", "16bit", "tiny", "outside", "bomb"])
def test_bad_images_are_found_when_the_data_is_read(case, tmp_path):
    from PIL import Image

    from train.data.formats import load_sft

    (tmp_path / "data").mkdir()
    name = {"outside": "../../etc/passwd"}.get(case, f"{case}.png")
    img = tmp_path / "data" / f"{case}.png"
    if case == "not_an_image":
        img.write_text("hello")
    elif case == "truncated":
        Image.new("RGB", (40, 40), (200, 10, 10)).save(img)
        img.write_bytes(img.read_bytes()[:-30])
    elif case == "cmyk":
        Image.new("CMYK", (40, 40)).save(img.with_suffix(".jpg"))
        name = "cmyk.jpg"
    elif case == "16bit":
        Image.new("I;16", (40, 40)).save(img)
    elif case == "tiny":
        Image.new("RGB", (2, 2)).save(img)
    elif case == "bomb":
        _bomb_png(img)
    rec = {
        "messages": [{"role": "user", "content": "<|image|>\nWhat?"}, {"role": "assistant", "content": "x"}],
        "images": [name],
    }
    data = tmp_path / "data" / "vlm.jsonl"
    data.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError) as e:
        load_sft(data)
    assert str(e.value).startswith(f"{data}:1: images[0]")
    assert "\n" not in str(e.value)


def test_the_decoded_image_cache_is_bounded(tmp_path):
    from PIL import Image

    from models import VLMConfig
    from train.data.images import ImageLoader

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(paths[-1])
    loader = ImageLoader(VLMConfig(image_size=8, patch_size=4), cache_bytes=3 * 8 * 8 * 4 * 2)
    for p in paths:
        loader([p])
    assert list(loader.cache) == paths[-2:]


# ---------------------------------------------------------------- 8. the exported tokenizer is the one that trained


def test_the_export_encodes_as_the_training_tokenizer(tmp_path, tokenizer_dir, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(export_hf(_micro_checkpoint(tmp_path, tokenizer_dir), tmp_path / "hf")))
    texts = [
        "cafe\u0301 au lait",
        "caf\u00e9",
        "日本語のテキスト",
        "emoji 😀👍🏽 here",
        "12345 + 678 = 13023",
        "<think>\nreason\n</think>\n\nanswer",
        "  spaces\tand\nnewlines  ",
    ]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False), text
    ids = tokenizer.encode("<think>\nx\n</think>\n\ny<|im_end|>", add_special_tokens=False)
    assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    )


# ---------------------------------------------------------------- 9. chat outgrows the context


def test_chat_drops_the_oldest_turns_and_goes_on(tmp_path, tokenizer_dir, capsys):
    from train.chat import ChatSession
    from train.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = make_config("dense", "micro", vocab_size=len(load_tokenizer(tokenizer_dir)), max_position_embeddings=96)
    save_model(DenseLM(cfg), tmp_path / "ck", tokenizer_dir)
    session = ChatSession(tmp_path / "ck", think=False, temperature=0.0, max_new_tokens=8)
    for i in range(8):
        session.reply(f"Question number {i}: what is {i} + {i}?")
    assert session.dropped_turns > 0
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users[-1].startswith("Question number 7") and not any(u.startswith("Question number 0") for u in users)
    assert "dropped its oldest turn" in capsys.readouterr().out
    with pytest.raises(UserError, match="the model's context is 96"):
        session.reply("word " * 200)
    assert session.messages[-1]["role"] == "assistant"  # the history is as it was


# ---------------------------------------------------------------- 10. resume checks what it resumes


def test_resume_survives_a_torn_metrics_line_and_refuses_other_data(tmp_path, synthetic_dir, tokenizer_dir, cli_error):
    out = tmp_path / "run"
    _run(_pretrain_args(synthetic_dir, tokenizer_dir, out, "--max-steps", "4", "--stop-after", "2"))
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # the disk filled in the middle of a write
    other = tmp_path / "other.jsonl"  # the same number of documents, other text: the same row count or not
    lines = (synthetic_dir / "pretrain_train.jsonl").read_text().splitlines()
    other.write_text("".join(json.dumps({"text": json.loads(x)["text"][::-1]}) + "\n" for x in lines))
    args = _pretrain_args(synthetic_dir, tokenizer_dir, out, "--max-steps", "4", "--resume")
    cli_error([a if a != str(synthetic_dir / "pretrain_train.jsonl") else str(other) for a in args], "other data")
    _run(args)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_dpo_resume_refuses_reference_logps_of_other_pairs(sft_model_dir, synthetic_dir, tmp_path, cli_error):
    pairs = (synthetic_dir / "dpo_train.jsonl").read_text().splitlines()[:8]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(pairs) + "\n")
    common = [
        "--init",
        str(sft_model_dir),
        "--out",
        str(tmp_path / "dpo"),
        "--seq-len",
        "128",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--eval-every",
        "0",
        "--no-progress",
    ]
    _run(["dpo", "--data", str(data), *common, "--stop-after", "1"])
    swapped = [
        json.dumps({**json.loads(p), "chosen": json.loads(p)["rejected"], "rejected": json.loads(p)["chosen"]})
        for p in pairs
    ]
    other = tmp_path / "swapped.jsonl"
    other.write_text("\n".join(swapped) + "\n")
    cli_error(["dpo", "--data", str(other), *common, "--resume"], "other data")
    (tmp_path / "dpo" / "reference_logps.pt").write_bytes(b"garbage")
    cli_error(["dpo", "--data", str(data), *common, "--resume"], "not a readable reference log-prob file")


# ---------------------------------------------------------------- 11. one error line, never a traceback


def test_bad_text_in_data_files_names_file_and_line(tmp_path):
    from train.data.formats import iter_pretrain_texts, load_sft

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8"):
        list(iter_pretrain_texts(bad))
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"ok \xff")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8"):
        list(iter_pretrain_texts(txt))
    lone = tmp_path / "lone.jsonl"
    lone.write_text(
        '{"messages": [{"role": "user", "content": "a \\ud800 b"}, {"role": "assistant", "content": "x"}]}\n'
    )
    with pytest.raises(DataError, match=r"lone.jsonl:1: a string holds a lone surrogate"):
        load_sft(lone)


def test_dpo_pairs_must_differ(tmp_path):
    from train.data.formats import load_dpo

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(DataError, match="p.jsonl:1: 'chosen' and 'rejected' are the same"):
        load_dpo(p)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--seq-len", "0"], "--seq-len must be at least 1"),
        (["--lr", "-1"], "--lr must be a finite positive number"),
        (["--lr", "nan"], "--lr must be a finite positive number"),
        (["--stop-after", "0"], "--stop-after must be at least 1"),
        (["--min-lr-ratio", "5"], "--min-lr-ratio is a fraction of --lr"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
        (["--warmup-steps", "-2"], "--warmup-steps must not be negative"),
        (["--decay-steps", "-5"], "--decay-steps must not be negative"),
    ],
)
def test_bad_training_options_are_one_error(extra, needle, tmp_path, synthetic_dir, tokenizer_dir, cli_error):
    cli_error(_pretrain_args(synthetic_dir, tokenizer_dir, tmp_path / "r", *extra), needle)
    assert not (tmp_path / "r").exists()


def test_a_bad_deepspeed_config_fails_before_deepspeed_starts(tmp_path, synthetic_dir, tokenizer_dir, cli_error):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    cli_error(
        _pretrain_args(synthetic_dir, tokenizer_dir, tmp_path / "r", "--deepspeed", str(cfg)),
        '"zero_optimization.stage" must be 0, 1, 2 or 3',
    )
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens must not be negative"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-k", "-3"], "--top-k must be at least 1"),
        (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or positive"),
    ],
)
def test_bad_sampling_options_are_one_error(extra, needle, tmp_path, tokenizer_dir, cli_error):
    ck = _micro_checkpoint(tmp_path, tokenizer_dir)
    cli_error(["sample", "--checkpoint", str(ck), "--prompt", "hi", *extra], needle)


def test_chat_and_sample_limits(tmp_path, tokenizer_dir, cli_error):
    ck = _micro_checkpoint(tmp_path, tokenizer_dir)
    cli_error(
        ["chat", "--checkpoint", str(ck), "--prompt", "hi", "--repetition-penalty", "0"],
        "--repetition-penalty must be positive",
    )
    cli_error(["sample", "--checkpoint", str(ck), "--prompt", "word " * 300], "longer than the model's context")


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(
    tmp_path, synthetic_dir, tokenizer_dir, cli_error, monkeypatch
):
    import errno

    import models.checkpoint as ckpt

    out = tmp_path / "run"
    _run(_pretrain_args(synthetic_dir, tokenizer_dir, out, "--max-steps", "2", "--stop-after", "1"))
    real = ckpt.save_file

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full)
    cli_error(
        _pretrain_args(synthetic_dir, tokenizer_dir, out, "--max-steps", "2", "--resume"),
        "No space left on device); step_0000001 stays the latest",
    )
    monkeypatch.setattr(ckpt, "save_file", real)
    assert (out / "latest").read_text().strip() == "step_0000001"
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_an_unrelated_tokenizer_beside_a_model_is_refused(tmp_path, synthetic_dir, sft_model_dir, cli_error):
    from train.data.tokenizer import train_tokenizer

    other = tmp_path / "tok"
    train_tokenizer([synthetic_dir / "dpo_eval.jsonl"], 300, other, quiet=True)  # smaller: passes the size check
    cli_error(
        [
            "sft",
            "--init",
            str(sft_model_dir),
            "--tokenizer",
            str(other),
            "--data",
            str(synthetic_dir / "sft_train.jsonl"),
            "--out",
            str(tmp_path / "s"),
            "--no-progress",
        ],
        "vocabularies differ",
    )


def test_flipped_bytes_in_weights_are_detected(tmp_path, tokenizer_dir, cli_error):
    ck = _micro_checkpoint(tmp_path, tokenizer_dir)
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-5] ^= 0x10  # inside the last tensor: still a valid safetensors file
    (ck / "model.safetensors").write_bytes(bytes(data))
    cli_error(["sample", "--checkpoint", str(ck), "--prompt", "hi"], "do not match the checksum")
    shutil.rmtree(ck)


# ---------------------------------------------------------------- 12. the VLM export loads with AutoProcessor


def test_vlm_export_loads_with_auto_processor_and_the_same_pixels(tmp_path, tokenizer_dir, tokenizer):
    from PIL import Image
    from transformers import AutoProcessor

    from models import VLM, VLMConfig
    from train.data.images import load_image

    text = make_config("dense", "micro", vocab_size=len(tokenizer))
    vlm = VLM(
        VLMConfig(
            text_config=text, image_size=32, patch_size=8, image_token_id=tokenizer.convert_tokens_to_ids("<|image|>")
        )
    )
    save_model(vlm, tmp_path / "vlm", tokenizer_dir)
    out = export_hf(tmp_path / "vlm", tmp_path / "hf")
    processor = AutoProcessor.from_pretrained(str(out))
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(50, 70, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "x.png")
    batch = processor(images=Image.open(tmp_path / "x.png"), text="<|image|>\nWhat?", return_tensors="pt")
    ours = load_image(tmp_path / "x.png", 32)
    assert (batch["pixel_values"][0] - ours).abs().max().item() < 1e-5
    assert int((batch["input_ids"] == vlm.config.image_token_id).sum()) == vlm.config.image_tokens
