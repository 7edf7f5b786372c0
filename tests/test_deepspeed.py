"""DeepSpeed and torchrun on 2 CPU ranks (gloo): ZeRO-1/2/3 and an offload config give the losses of a
one-process run with the same global batch; a ZeRO-3 run stops, resumes and exports to transformers.

Tolerance: every training and held-out loss within 1e-5 relative of the one-process run (measured
here: about 3e-8; the only difference is the order of the gradient reduction).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.engine.metrics import read_metrics
from train.pretrain import main as pretrain_main

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-5
GLOBAL_BATCH = 8


def _common(synthetic_dir, tokenizer_dir, out):
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
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--warmup-steps",
        "2",
        "--save-every",
        "2",
        "--seed",
        "1",
        "--no-progress",
    ]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(launcher: str, args: list[str], config: str | None = None, module: str = "train.pretrain"):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    port = _port()
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--module", module]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", module]
    cmd += args + ["--batch-size", str(GLOBAL_BATCH // 2)]
    if config:
        cmd += ["--deepspeed", str(ROOT / "ds_configs" / config)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    # DeepSpeed's CPU all-reduce buffers (~70 MB each, in RAM) are unlinked by the engine, not left behind
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return r


def _losses(out: Path) -> list[tuple[int, str, float]]:
    return [(r["step"], k, r[k]) for r in read_metrics(out / "metrics.jsonl") for k in ("loss", "eval_loss") if k in r]


def _assert_same(got, want):
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want]
    for (step, key, a), (_, _, b) in zip(got, want):
        assert a == pytest.approx(b, rel=RTOL), (step, key, a, b)


@pytest.fixture(scope="module")
def reference(synthetic_dir, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    pretrain_main(_common(synthetic_dir, tokenizer_dir, out) + ["--batch-size", str(GLOBAL_BATCH)])
    return _losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero1.json", "zero2.json", "zero2_offload.json"])
def test_deepspeed_two_ranks_match_one_process(config, reference, synthetic_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    r = _launch("deepspeed", _common(synthetic_dir, tokenizer_dir, out), config)
    _assert_same(_losses(out), reference)
    assert r.stdout.count("pretrain: ") == 1  # only rank 0 prints
    ckpt = out / "checkpoints" / "step_0000004"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "mp_rank_00_model_states.pt").exists()


@pytest.mark.slow
def test_torchrun_ddp_matches_one_process(reference, synthetic_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    _launch("torchrun", _common(synthetic_dir, tokenizer_dir, out))
    _assert_same(_losses(out), reference)


@pytest.mark.slow
def test_zero3_stop_resume_continue_and_export(reference, synthetic_dir, tokenizer_dir, tmp_path):
    out = tmp_path / "run"
    args = _common(synthetic_dir, tokenizer_dir, out)
    _launch("deepspeed", args + ["--stop-after", "2"], "zero3.json")
    assert (out / "latest").read_text().strip() == "step_0000002"
    # what a run killed in the middle of its next save leaves behind: a half-written temporary directory
    stale = out / "checkpoints" / ".tmp-step_0000004"
    stale.mkdir()
    (stale / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"partial")
    _launch("deepspeed", args + ["--resume"], "zero3.json")
    _assert_same(_losses(out), reference)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step_0000002", "step_0000004"]

    # export a bare ZeRO-3 checkpoint (shards only): consolidated weights must give the in-memory model's logits
    ckpt = out / "checkpoints" / "step_0000004"
    bare = tmp_path / "bare" / "step_0000004"
    shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns("model.safetensors"))
    export = [str(BIN / "llm-scratch"), "export", "--checkpoint", str(bare), "--out", str(tmp_path / "hf")]
    r = subprocess.run(export, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--consolidate-zero" in r.stderr  # pickled shards: only when asked for
    r = subprocess.run(export + ["--consolidate-zero"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM

    from models import load_pretrained

    in_memory = load_pretrained(ckpt).eval()  # gathered from the ranks' ZeRO-3 partitions at save time
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    ids = torch.randint(0, in_memory.config.vocab_size, (2, 40))
    with torch.no_grad():
        a, b = in_memory(ids).logits, hf(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-5


def _finetune_args(kind: str, init: Path, synthetic_dir: Path, out: Path) -> list[str]:
    return [
        "--init",
        str(init),
        "--data",
        str(synthetic_dir / f"{kind}_train.jsonl"),
        "--eval-data",
        str(synthetic_dir / f"{kind}_eval.jsonl"),
        "--out",
        str(out),
        "--seq-len",
        "256",
        "--max-steps",
        "3",
        "--eval-every",
        "3",
        "--eval-batches",
        "2",
        "--warmup-steps",
        "1",
        "--lr",
        "1e-3",
        "--seed",
        "2",
        "--no-progress",
    ]


@pytest.mark.slow
def test_sft_and_dpo_under_deepspeed_match_one_process(sft_model_dir, synthetic_dir, tmp_path):
    """SFT under ZeRO-2 (rows of different lengths on each rank: the loss is weighted by target tokens
    over the global batch) and DPO under ZeRO-3 with its frozen reference as a partitioned inference
    engine, against one process (DPO there with precomputed reference log-probs)."""
    from train.dpo import main as dpo_main
    from train.sft import main as sft_main

    sft_main(_finetune_args("sft", sft_model_dir, synthetic_dir, tmp_path / "sft1") + ["--batch-size", "8"])
    _launch(
        "deepspeed",
        _finetune_args("sft", sft_model_dir, synthetic_dir, tmp_path / "sft2"),
        "zero2.json",
        module="train.sft",
    )
    _assert_same(_losses(tmp_path / "sft2"), _losses(tmp_path / "sft1"))

    dpo_main(_finetune_args("dpo", sft_model_dir, synthetic_dir, tmp_path / "dpo1") + ["--batch-size", "8"])
    _launch(
        "deepspeed",
        _finetune_args("dpo", sft_model_dir, synthetic_dir, tmp_path / "dpo2") + ["--reference", "model"],
        "zero3.json",
        module="train.dpo",
    )
    _assert_same(_losses(tmp_path / "dpo2"), _losses(tmp_path / "dpo1"))


@pytest.mark.slow
def test_vlm_alignment_and_sft_under_deepspeed_match_one_process(sft_model_dir, tmp_path):
    """The VLM through the deepspeed launcher: alignment with the language model frozen (ZeRO-2; frozen
    parameters are left out of the optimizer) and SFT on image questions (ZeRO-3), against one process."""
    from train.data.synthetic_images import generate_images
    from train.sft import main as sft_main
    from train.vlm_init import init_vlm

    data = generate_images(tmp_path / "img", train=32, held_out=8)
    init_vlm(str(sft_model_dir), str(tmp_path / "vlm0"), preset="micro")

    def args(kind, init, out, extra=()):
        return [
            "--init",
            str(init),
            "--data",
            str(data[f"vlm_{kind}_train"]),
            "--eval-data",
            str(data[f"vlm_{kind}_eval"]),
            "--out",
            str(out),
            "--seq-len",
            "96",
            "--max-steps",
            "3",
            "--eval-every",
            "3",
            "--eval-batches",
            "2",
            "--warmup-steps",
            "1",
            "--lr",
            "3e-3",
            "--seed",
            "2",
            "--no-progress",
            *extra,
        ]

    frozen = ("--train", "projector,vision")
    sft_main(args("caption", tmp_path / "vlm0", tmp_path / "a1", frozen) + ["--batch-size", "8"])
    _launch("deepspeed", args("caption", tmp_path / "vlm0", tmp_path / "a2", frozen), "zero2.json", module="train.sft")
    _assert_same(_losses(tmp_path / "a2"), _losses(tmp_path / "a1"))
    sft_main(args("sft", tmp_path / "a1", tmp_path / "s1") + ["--batch-size", "8"])
    _launch("deepspeed", args("sft", tmp_path / "a1", tmp_path / "s2"), "zero3.json", module="train.sft")
    _assert_same(_losses(tmp_path / "s2"), _losses(tmp_path / "s1"))
    from models import load_pretrained

    aligned, start = load_pretrained(tmp_path / "a2"), load_pretrained(tmp_path / "vlm0")
    for name, p in aligned.language_model.state_dict().items():  # frozen: unchanged by the alignment
        assert torch.equal(p, start.language_model.state_dict()[name]), name


def _resolve(raw, **over):
    from train.engine.ds_config import resolve_ds_config

    kw = dict(
        path="cfg.json",
        micro_batch=4,
        grad_accum=2,
        world_size=2,
        grad_clip=1.0,
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        bf16=False,
        hidden_size=64,
    )
    kw.update(over)
    return resolve_ds_config(raw, **kw)


def test_auto_values_are_filled_from_the_arguments():
    cfg = _resolve(json.loads((ROOT / "ds_configs" / "zero3.json").read_text()))
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 16 and cfg["gradient_clipping"] == 1.0 and cfg["bf16"]["enabled"] is False
    assert cfg["optimizer"]["params"] == {
        "lr": 1e-3,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.1,
        "torch_adam": True,
    }
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 640


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"gradient_accumulation_steps": 4}, '"gradient_accumulation_steps" is 4 but --grad-accum gives 2'),
        ({"train_batch_size": 8}, '"train_batch_size" is 8 but --batch-size x --grad-accum x world size gives 16'),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, 'optimizer.params: "lr" is 0.1 but --lr gives 0.001'),
        ({"scheduler": {"type": "WarmupLR"}}, '"scheduler" must not be set'),
        ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}, '"zero_optimization.sub_group_size" is "auto"'),
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
    ],
)
def test_contradicting_config_names_the_key(raw, needle):
    from train.errors import UserError

    with pytest.raises(UserError) as e:
        _resolve(raw)
    assert needle in str(e.value) and "cfg.json" in str(e.value)


@pytest.mark.slow
def test_plain_run_does_not_import_deepspeed(synthetic_dir, tokenizer_dir, tmp_path):
    code = (
        "import sys; from train.pretrain import main; main(sys.argv[1:]); "
        "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'"
    )
    args = _common(synthetic_dir, tokenizer_dir, tmp_path / "run") + ["--max-steps", "1", "--batch-size", "2"]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def moe_reference(synthetic_dir, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_single") / "run"
    pretrain_main(_common(synthetic_dir, tokenizer_dir, out) + ["--model", "moe", "--batch-size", str(GLOBAL_BATCH)])
    return _losses(out)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero1.json", "zero2.json", "zero3.json"])
def test_moe_under_zero_matches_one_process(config, moe_reference, synthetic_dir, tokenizer_dir, tmp_path):
    """The MoE model (experts replicated and ZeRO-partitioned; under ZeRO-3 each MoE block is a leaf module,
    gathered whole, so ranks whose tokens skip an expert still take part in the same gathers); the expert
    bias update sums the loads over ranks, so the routing, and the losses, equal one process's."""
    out = tmp_path / "run"
    _launch("deepspeed", _common(synthetic_dir, tokenizer_dir, out) + ["--model", "moe"], config)
    _assert_same(_losses(out), moe_reference)
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert all(r["load_max_mean"] >= 1.0 for r in recs)
    from models import load_pretrained

    model = load_pretrained(out)
    assert type(model).__name__ == "MoELM"
    assert any(b.gate.e_score_correction_bias.abs().sum() > 0 for b in model.moe_blocks())  # the bias was saved


@pytest.mark.slow
def test_moe_under_zero3_with_activation_checkpointing_matches_one_process(
    moe_reference, synthetic_dir, tokenizer_dir, tmp_path
):
    """Every decoder layer recomputed in the backward while ZeRO-3 gathers its partitioned parameters
    again for the recomputation: the losses (and so the routing and the expert-bias updates) are one
    process's without checkpointing."""
    out = tmp_path / "run"
    args = _common(synthetic_dir, tokenizer_dir, out) + ["--model", "moe", "--activation-checkpointing"]
    _launch("deepspeed", args, "zero3.json")
    _assert_same(_losses(out), moe_reference)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_compiled_layers_on_two_ranks_match_one_process(launcher, reference, synthetic_dir, tokenizer_dir, tmp_path):
    """--compile (each decoder layer through torch.compile) under DeepSpeed ZeRO-2 and under DDP: one
    eager process's losses."""
    out = tmp_path / "run"
    args = _common(synthetic_dir, tokenizer_dir, out) + ["--compile"]
    _launch(launcher, args, "zero2.json" if launcher == "deepspeed" else None)
    _assert_same(_losses(out), reference)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_grpo_on_two_ranks_matches_one_process(launcher, sft_model_dir, synthetic_dir, tmp_path, monkeypatch):
    """GRPO under DDP and under ZeRO-2: each rank samples its share of the prompts, and a prompt's samples
    do not depend on where it is sampled (train/grpo.py), so two ranks give one process's rollouts,
    rewards, losses and KL, with two inner steps per rollout and the KL in the loss. (A reward that the
    micro model's samples differ in, so the advantages are not all zero.)"""
    from train.grpo import main as grpo_main

    (tmp_path / "ranks_reward.py").write_text("def r(completion, answer, finished):\n    return len(completion) % 5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))

    def args(out):
        return [
            "--init",
            str(sft_model_dir),
            "--data",
            str(synthetic_dir / "rl_train.jsonl"),
            "--out",
            str(out),
            "--group-size",
            "4",
            "--prompts-per-step",
            "4",
            "--max-new-tokens",
            "24",
            "--max-steps",
            "4",
            "--inner-steps",
            "2",
            "--kl-beta",
            "0.05",
            "--eval-every",
            "0",
            "--save-every",
            "4",
            "--lr",
            "1e-3",
            "--seed",
            "5",
            "--no-progress",
            "--reward",
            "exact=1",
            "ranks_reward:r=0.5",
        ]

    grpo_main(args(tmp_path / "one") + ["--batch-size", "8"])
    _launch(launcher, args(tmp_path / "two"), "zero2.json" if launcher == "deepspeed" else None, module="train.grpo")
    keys = ("loss", "grad_norm", "reward", "kl", "response_length", "clip_fraction")
    got, want = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("two", "one"))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    # Step 1's loss is zero but for rounding (ratio 1, no KL yet, each group's advantages sum to zero), and
    # the two runs sum it in a different order: an absolute slack of float32 rounding on O(1) terms.
    for a, b in zip(got, want):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=RTOL, abs=1e-7), (a["step"], k, a[k], b[k])
    assert abs(want[0]["loss"]) < 1e-6 and any(abs(r["loss"]) > 1e-4 for r in want[1:])
    assert all(r["grad_norm"] > 0 for r in want) and want[1]["kl"] > 0
