"""Pretraining on the synthetic data: the loss falls, resume is exact, checkpoints are atomic."""

import json

import pytest
import torch

from train.engine.metrics import read_metrics
from train.pretrain import main as pretrain_main


def _args(synthetic_dir, tokenizer_dir, out, *extra):
    return [
        "--data",
        str(synthetic_dir / "pretrain_train.jsonl"),
        "--eval-data",
        str(synthetic_dir / "pretrain_eval.jsonl"),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(out),
        "--preset",
        "micro",
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--no-progress",
        "--seed",
        "1",
        *extra,
    ]


def test_held_out_loss_falls(synthetic_dir, tokenizer_dir, tmp_path):
    # 80 steps of 16 rows x 64 tokens on the 0.15M-parameter micro model, lr 1e-2, 8 warmup steps.
    s = pretrain_main(
        _args(
            synthetic_dir,
            tokenizer_dir,
            tmp_path / "run",
            "--max-steps",
            "80",
            "--batch-size",
            "16",
            "--eval-every",
            "40",
            "--eval-batches",
            "4",
            "--warmup-steps",
            "8",
            "--lr",
            "1e-2",
        )
    )
    before, after = s["eval_before"]["eval_loss"], s["eval_after"]["eval_loss"]
    # measured here: 6.7 -> 1.4 nats (an untrained model is near ln(vocab) ~ 6.6)
    assert before > 6.0
    assert after < 0.35 * before
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs if "eval_loss" in r] == [0, 40, 80]
    assert all(r["tokens_per_s"] > 0 and r["tokens"] == 1024 for r in recs if "loss" in r)
    # model FLOPs per step from the config (16 rows of 64), achieved FLOP/s; no MFU without a known peak (CPU)
    from models import load_config
    from models.flops import training_flops

    config = load_config(tmp_path / "run" / "checkpoints" / "step_0000080" / "model_config.json")
    steps = [r for r in recs if "loss" in r]
    assert all(r["flops"] == training_flops(config, 16, 64) and r["tflops_per_s"] > 0 for r in steps)
    assert not any("mfu" in r for r in recs)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["end_step"] == 80


def test_resume_is_exact(synthetic_dir, tokenizer_dir, tmp_path):
    common = (
        "--max-steps",
        "8",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--warmup-steps",
        "2",
        "--save-every",
        "100",
        "--grad-accum",
        "2",
    )
    pretrain_main(_args(synthetic_dir, tokenizer_dir, tmp_path / "straight", *common))
    pretrain_main(_args(synthetic_dir, tokenizer_dir, tmp_path / "split", *common, "--stop-after", "4"))
    assert (tmp_path / "split" / "latest").read_text().strip() == "step_0000004"
    pretrain_main(_args(synthetic_dir, tokenizer_dir, tmp_path / "split", *common, "--resume"))
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    split = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [r["step"] for r in split] == [r["step"] for r in straight]
    for a, b in zip(straight, split):
        for key in ("loss", "eval_loss", "lr", "grad_norm"):
            assert a.get(key) == b.get(key), (a["step"], key)  # bit-exact on CPU
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "straight" / "checkpoints" / "step_0000008" / "model.safetensors"))
    wb = load_file(str(tmp_path / "split" / "checkpoints" / "step_0000008" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_crash_during_save_keeps_the_previous_checkpoint(synthetic_dir, tokenizer_dir, tmp_path, monkeypatch):
    from train.engine import checkpoint

    out = tmp_path / "run"
    common = ("--max-steps", "4", "--eval-every", "0", "--save-every", "2", "--warmup-steps", "1")
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        if "step_0000004" in str(path):
            raise OSError("disk full")  # the process dies halfway through writing step 4
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", dying_save)
    from train.errors import UserError

    with pytest.raises(UserError, match="disk full.*step_0000002 stays the latest"):  # one error line, not a traceback
        pretrain_main(_args(synthetic_dir, tokenizer_dir, out, *common))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert (out / "latest").read_text().strip() == "step_0000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]  # no partial dir left
    s = pretrain_main(_args(synthetic_dir, tokenizer_dir, out, *common, "--resume"))
    assert s["start_step"] == 2 and s["end_step"] == 4


def test_vocab_mismatch_and_context_errors(synthetic_dir, tokenizer_dir, tmp_path):
    from models import make_config, save_config
    from train.errors import UserError

    small = make_config("dense", "micro", vocab_size=100)
    save_config(small, tmp_path / "small.json")
    with pytest.raises(UserError, match="the tokenizer has \\d+ tokens but the model's vocab_size is 100"):
        pretrain_main(
            _args(synthetic_dir, tokenizer_dir, tmp_path / "a", "--model-config", str(tmp_path / "small.json"))
        )
    with pytest.raises(UserError, match="--seq-len 512 is longer than the model's context"):
        pretrain_main(_args(synthetic_dir, tokenizer_dir, tmp_path / "b", "--seq-len", "512"))


def test_lr_schedule_warmup_then_cosine():
    from train.engine.optim import OptimConfig, lr_factor

    cfg = OptimConfig(warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and abs(f[9] - 0.55) < 1e-12 and f[14] == pytest.approx(0.1) and f[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_lr_schedule_warmup_stable_decay():
    """--decay-steps: the full rate from the end of warmup until the last N steps, then the same cosine over
    those N; a decay longer than the run after warmup is the plain warmup + cosine."""
    from train.engine.optim import OptimConfig, lr_factor

    cfg = OptimConfig(warmup_steps=2, max_steps=12, min_lr_ratio=0.0, decay_steps=4)
    f = [lr_factor(s, cfg) for s in range(14)]
    assert f[:2] == [0.5, 1.0] and f[2:9] == [1.0] * 7
    assert f[10] == pytest.approx(0.5) and f[12] == 0.0 and f[13] == 0.0
    assert all(a > b for a, b in zip(f[8:13], f[9:13]))
    long = OptimConfig(warmup_steps=4, max_steps=14, min_lr_ratio=0.1, decay_steps=100)
    plain = OptimConfig(warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [lr_factor(s, long) for s in range(16)] == [lr_factor(s, plain) for s in range(16)]


def test_no_weight_decay_on_norms_biases_embeddings():
    from models import DenseLM
    from train.engine.optim import param_groups

    model = DenseLM(__import__("models").make_config("dense", "micro", vocab_size=128))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("proj.weight") for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.bias",
    }
