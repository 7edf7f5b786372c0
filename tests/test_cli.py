"""The command line: real entry points end to end, and bad input -> one 'error:' line, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _run(*argv, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_pipeline_through_the_real_entry_points(tmp_path):
    data, tok, run, hf = tmp_path / "data", tmp_path / "tok", tmp_path / "run", tmp_path / "hf"
    cli = str(BIN / "llm-scratch")
    r = _run(cli, "data", "--out", str(data), "--pretrain-docs", "400", "--sft", "40", "--dpo", "20")
    assert r.returncode == 0, r.stderr
    for name in ("pretrain", "sft", "dpo"):
        for split in ("train", "eval"):
            assert (data / f"{name}_{split}.jsonl").stat().st_size > 0
    r = _run(
        cli,
        "tokenizer",
        "--data",
        str(data / "pretrain_train.jsonl"),
        "--vocab-size",
        "512",
        "--out",
        str(tok),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    from train.data.tokenizer import load_tokenizer

    assert 256 + 7 < len(load_tokenizer(tok)) <= 512
    r = _run(
        sys.executable,
        "-m",
        "train.pretrain",
        "--data",
        str(data / "pretrain_train.jsonl"),
        "--tokenizer",
        str(tok),
        "--out",
        str(run),
        "--preset",
        "micro",
        "--max-steps",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / "step_0000003" / "model.safetensors").exists()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    r = _run(cli, "export", "--checkpoint", str(run), "--out", str(hf))
    assert r.returncode == 0, r.stderr
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    r = _run(cli, "sample", "--checkpoint", str(hf), "--prompt", "Mia has", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.startswith("Mia has"), r.stderr


@pytest.mark.slow
def test_demo_quick(tmp_path):
    r = _run(str(BIN / "llm-scratch"), "demo", "--quick", "--out", str(tmp_path / "demo"), "--seed", "7")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(res["text_accuracy"]) == {"pretrain", "sft", "dpo", "grpo"} and res["seed"] == 7
    assert 0 <= res["grpo"]["last_accuracy"] <= 1
    assert "GRPO" in r.stdout
    assert all(0 <= a["overall"] <= 1 for a in res["text_accuracy"].values())
    assert res["pretrain"]["eval_loss_after"] < res["pretrain"]["eval_loss_before"]
    assert res["moe"]["hf_max_diff"] < 1e-4 and res["moe"]["load_peak"] >= 1.0
    assert res["chat_agrees_with_transformers"] == [2, 2]  # transformers generates the same tokens
    assert set(res["vlm"]["accuracy"]) == {"init", "align", "sft", "dpo", "grpo"} and res["vlm"]["hf_max_diff"] < 1e-4
    assert 0 <= res["dpo_pairs"]["after"]["eval_accuracy"] <= 1
    for stage in ("pretrain", "moe", "sft", "dpo", "grpo", "vlm_align", "vlm_sft", "vlm_dpo", "vlm_grpo"):
        assert (tmp_path / "demo" / stage / "loss.png").exists()
    for export in ("hf", "moe_hf", "vlm_hf"):
        assert (tmp_path / "demo" / export / "config.json").exists()


def test_bad_inputs_give_one_clear_error(tmp_path, cli_error, tokenizer_dir):
    cli_error(
        ["tokenizer", "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "t")],
        "none.txt: data file not found",
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 12}\n')
    cli_error(
        [
            "pretrain",
            "--data",
            str(bad),
            "--tokenizer",
            str(tokenizer_dir),
            "--out",
            str(tmp_path / "r"),
            "--no-progress",
        ],
        f"{bad}:2: field 'text' must be a string",
    )
    cli_error(["pretrain", "--data", str(bad), "--out", str(tmp_path / "r")], "--tokenizer DIR is required")
    cli_error(
        ["pretrain", "--data", str(bad), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "r")],
        "not a tokenizer directory",
    )
    cli_error(
        ["pretrain", "--data", str(bad), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "r"), "--resume"],
        "no checkpoint in",
    )
    cli_error(
        ["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "h")],
        "no such checkpoint directory",
    )


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_seq_len_longer_than_the_context_is_one_error_in_every_stage(
    stage, tmp_path, cli_error, sft_model_dir, synthetic_dir, tokenizer_dir
):
    """One check shared by every stage: the micro model's context is 256 tokens."""
    if stage == "pretrain":
        argv = [
            "pretrain",
            "--data",
            str(synthetic_dir / "pretrain_train.jsonl"),
            "--tokenizer",
            str(tokenizer_dir),
            "--preset",
            "micro",
        ]
    else:
        argv = [stage, "--init", str(sft_model_dir), "--data", str(synthetic_dir / f"{stage}_train.jsonl")]
    cli_error(
        argv + ["--out", str(tmp_path / "r"), "--seq-len", "300", "--no-progress"],
        "--seq-len 300 is longer than the model's context (max_position_embeddings=256)",
    )
    assert not (tmp_path / "r").exists()


def test_tokenizer_that_does_not_match_the_checkpoint(tmp_path, cli_error, tokenizer_dir):
    from models import DenseLM, make_config, save_model

    save_model(DenseLM(make_config("dense", "micro", vocab_size=64)), tmp_path / "ck", tokenizer_dir)
    cli_error(["sample", "--checkpoint", str(tmp_path / "ck"), "--prompt", "hi"], "the tokenizer has")


@pytest.mark.slow
def test_verify_every_stage_learns(tmp_path):
    r = _run(str(BIN / "llm-scratch"), "verify", "--out", str(tmp_path / "v"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = json.loads((tmp_path / "v" / "verify.json").read_text())
    runs = [(row["model"], row["stage"]) for row in rows]
    assert runs == [(m, s) for m in ("dense", "moe") for s in ("pretrain", "sft", "dpo", "grpo")] + [
        ("vlm", s) for s in ("align", "sft", "dpo")
    ]
    for row in rows:  # losses fall; GRPO's sampled reward rises
        assert row["last"] < row["first"] if row["measure"] == "loss" else row["last"] > row["first"], row


@pytest.mark.slow
def test_chat_one_shot_cli(tmp_path, tokenizer_dir):
    from models import DenseLM, make_config, save_model
    from train.data.tokenizer import load_tokenizer

    save_model(
        DenseLM(make_config("dense", "micro", vocab_size=len(load_tokenizer(tokenizer_dir)))),
        tmp_path / "ck",
        tokenizer_dir,
    )
    args = (
        str(BIN / "llm-scratch"),
        "chat",
        "--checkpoint",
        str(tmp_path / "ck"),
        "--prompt",
        "What is 1 + 2?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    )
    a, b = _run(*args), _run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout  # greedy: deterministic
    assert "Traceback" not in a.stderr
