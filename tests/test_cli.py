"""The command line: real entry points end to end, and bad input -> one 'error:' line, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.cli import main as cli_main

BIN = Path(sys.executable).parent


def _run(*argv, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(list(argv), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_pipeline_through_the_real_entry_points(tmp_path):
    data, tok, run, hf = tmp_path / "data", tmp_path / "tok", tmp_path / "run", tmp_path / "hf"
    cli = str(BIN / "llm-scratch")
    r = _run(cli, "data", "--out", str(data), "--pretrain-docs", "400", "--sft", "40", "--dpo", "20")
    assert r.returncode == 0, r.stderr
    assert "pretrain_train" in r.stdout and (data / "dpo_eval.jsonl").exists()
    r = _run(cli, "tokenizer", "--data", str(data / "pretrain_train.jsonl"), "--vocab-size", "512",
             "--out", str(tok), "--quiet")
    assert r.returncode == 0 and "tokens from" in r.stdout, r.stderr
    r = _run(sys.executable, "-m", "train.pretrain", "--data", str(data / "pretrain_train.jsonl"),
             "--tokenizer", str(tok), "--out", str(run), "--preset", "micro", "--max-steps", "3",
             "--seq-len", "32", "--batch-size", "4", "--eval-every", "0", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / "step_0000003" / "model.safetensors").exists()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    r = _run(cli, "export", "--checkpoint", str(run), "--out", str(hf))
    assert r.returncode == 0, r.stderr
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    r = _run(cli, "sample", "--checkpoint", str(hf), "--prompt", "Mia has", "--max-new-tokens", "5")
    assert r.returncode == 0 and r.stdout.startswith("Mia has"), r.stderr


def test_demo_quick(tmp_path):
    r = _run(str(BIN / "llm-scratch"), "demo", "--quick", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "[9/9]" in out and "held-out loss" in out and "held-out results" in out
    assert "expert load" in out and "DeepseekV3ForCausalLM" in out
    assert "VLM held-out results" in out and "LlavaForConditionalGeneration" in out
    assert "2/2 chat answers are token-for-token the same as our model's" in out
    for stage in ("pretrain", "sft", "dpo"):
        assert (tmp_path / "demo" / stage / "loss.png").exists()
    assert (tmp_path / "demo" / "hf" / "model.safetensors").exists()


def _expect_error(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert err.count("\n") == 1, err  # one line
    return err


def test_bad_inputs_give_one_clear_error(tmp_path, capsys, tokenizer_dir):
    _expect_error(capsys, ["tokenizer", "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "t")],
                  "none.txt: data file not found")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 12}\n')
    _expect_error(capsys, ["pretrain", "--data", str(bad), "--tokenizer", str(tokenizer_dir),
                           "--out", str(tmp_path / "r"), "--no-progress"], f"{bad}:2: field 'text' must be a string")
    _expect_error(capsys, ["pretrain", "--data", str(bad), "--out", str(tmp_path / "r")], "--tokenizer DIR is required")
    _expect_error(capsys, ["pretrain", "--data", str(bad), "--tokenizer", str(tmp_path), "--out", str(tmp_path / "r")],
                  "not a tokenizer directory")
    _expect_error(capsys, ["pretrain", "--data", str(bad), "--tokenizer", str(tokenizer_dir),
                           "--out", str(tmp_path / "r"), "--resume"], "no checkpoint in")
    _expect_error(capsys, ["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "h")],
                  "no such checkpoint directory")


def test_tokenizer_that_does_not_match_the_checkpoint(tmp_path, capsys, tokenizer_dir):
    from models import DenseLM, make_config, save_model

    save_model(DenseLM(make_config("dense", "micro", vocab_size=64)), tmp_path / "ck", tokenizer_dir)
    _expect_error(capsys, ["sample", "--checkpoint", str(tmp_path / "ck"), "--prompt", "hi"],
                  "the tokenizer has")


def test_verify_every_stage_learns(tmp_path):
    r = _run(str(BIN / "llm-scratch"), "verify", "--out", str(tmp_path / "v"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    for model in ("dense", "moe"):
        for stage in ("pretrain", "sft", "dpo"):
            assert f"verify: {model:6s} {stage:8s} loss" in r.stdout
    for stage in ("align", "sft", "dpo"):
        assert f"verify: vlm    {stage:8s} loss" in r.stdout
    assert "all 9 stage runs finite and falling" in r.stdout


def test_chat_one_shot_cli(tmp_path, tokenizer_dir):
    from models import DenseLM, make_config, save_model
    from train.tokenizer import load_tokenizer

    save_model(DenseLM(make_config("dense", "micro", vocab_size=len(load_tokenizer(tokenizer_dir)))),
               tmp_path / "ck", tokenizer_dir)
    args = (str(BIN / "llm-scratch"), "chat", "--checkpoint", str(tmp_path / "ck"), "--prompt", "What is 1 + 2?",
            "--temperature", "0", "--max-new-tokens", "12")
    a, b = _run(*args), _run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout  # greedy: deterministic
    assert "Traceback" not in a.stderr
