"""Expert parallelism on 2 CPU ranks (gloo all-to-all): the same loss and gradients as one process
holding every expert, and a torchrun training run whose checkpoint gathers the expert slices."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models import MoELM, load_pretrained, make_config
from train.engine.optim import OptimConfig
from train.engine.torch_engine import TorchEngine

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # max abs difference of losses and of every gradient (fp32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> MoELM:
    torch.manual_seed(0)
    # 6 experts over 2 ranks, top-3, two groups: tokens cross ranks in both directions
    return MoELM(
        make_config(
            "moe",
            "micro",
            vocab_size=97,
            n_routed_experts=6,
            num_experts_per_tok=3,
            n_group=2,
            topk_group=2,
            initializer_range=0.1,
            num_hidden_layers=3,
        )
    )


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 24), generator=g)
    return ids, torch.roll(ids, -1, 1)


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    ids, targets = _batch()
    # the reference: one process, every expert, the whole global batch
    ref = _model().train()
    ref_loss = ref(ids, targets=targets).loss
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    # expert parallel: each rank its half of the batch and half of the experts
    model = _model().train()
    engine = TorchEngine(model, OptimConfig(grad_clip=0.0), torch.device("cpu"), expert_parallel_size=world)
    half = ids.shape[0] // world
    rows = slice(rank * half, (rank + 1) * half)
    loss = engine.module(ids[rows], targets=targets[rows]).loss
    engine.backward(loss)
    engine._reduce_expert_grads()
    import torch.distributed as dist

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    result = {"loss": (mean_loss - ref_loss.detach()).abs().item(), "grads": {}}
    for name, p in model.named_parameters():
        expected = ref_grads[name]
        if name in engine.expert_params:
            n = p.shape[0]
            expected = expected[rank * n : (rank + 1) * n]
        result["grads"][name] = (p.grad - expected).abs().max().item()
    result["local_experts"] = model.moe_blocks()[0].experts.gate_up_proj.shape[0]
    full = engine.full_state_dict()
    result["gathered"] = all(torch.equal(full[n], ref.state_dict()[n]) for n in engine.expert_params)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_expert_parallel_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt")
        assert r["local_experts"] == 3
        assert r["loss"] < TOLERANCE
        bad = {n: d for n, d in r["grads"].items() if d > TOLERANCE}
        assert not bad, bad
        assert r["gathered"]


def _ep_pretrain_cmd(out, synthetic_dir, tokenizer_dir) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "train.pretrain",
        "--data",
        str(synthetic_dir / "pretrain_train.jsonl"),
        "--tokenizer",
        str(tokenizer_dir),
        "--out",
        str(out),
        "--model",
        "moe",
        "--preset",
        "micro",
        "--expert-parallel-size",
        "2",
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--warmup-steps",
        "2",
        "--no-progress",
    ]


@pytest.mark.slow
def test_torchrun_trains_moe_with_expert_parallelism(tmp_path, synthetic_dir, tokenizer_dir):
    """3 steps, then --resume for 3 more (each rank reloads its expert slice and optimizer state):
    the same weights as 6 steps in one go; the checkpoint holds every expert."""
    out, straight = tmp_path / "ep", tmp_path / "straight"
    cmd = _ep_pretrain_cmd(out, synthetic_dir, tokenizer_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--stop-after", "3"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    subprocess.run(
        _ep_pretrain_cmd(straight, synthetic_dir, tokenizer_dir),
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    model = load_pretrained(out)  # the gathered checkpoint holds every expert
    reference = load_pretrained(straight)
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.moe_blocks()[0].experts.gate_up_proj.shape[0] == model.config.n_routed_experts
    import json

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7)) and all("load_max_mean" in r for r in steps)
    assert (out / "checkpoints" / "step_0000006" / "trainer_state_rank1.pt").exists()


def test_expert_parallel_refuses_deepspeed_and_dense(tmp_path):
    from train.engine.interface import make_engine
    from train.errors import UserError

    with pytest.raises(UserError, match="expert-parallel-size"):
        make_engine(_model(), OptimConfig(), torch.device("cpu"), "ds_configs/zero2.json", 2, 2)
