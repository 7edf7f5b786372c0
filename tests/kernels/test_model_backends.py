"""One forward + backward of the dense and MoE models gives the same loss and gradients with kernel backend
`triton` (the interpreter on CPU) as with `torch`; the backend is the process's runtime setting."""

import pytest
import torch
from kernel_testing import ON_GPU, rel_err

import kernels
from models import DenseLM, make_config

TOL = 2e-5  # fp32: the kernels reorder a few reductions


@pytest.mark.parametrize("tied", [True, False])
def test_dense_model_triton_equals_torch(tied):
    device = "cuda" if ON_GPU else "cpu"
    torch.manual_seed(0)
    cfg = make_config("dense", "micro", vocab_size=97, tie_word_embeddings=tied, initializer_range=0.1)
    ref = DenseLM(cfg).to(device)
    tri = DenseLM(cfg).to(device)
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 97, (2, 19), device=device)
    targets = torch.roll(ids, -1, 1)
    segments = torch.tensor([[0] * 7 + [1] * 12, [0] * 19], device=device)  # a packed row
    positions = torch.cat([torch.arange(7), torch.arange(12)]).to(device)
    positions = torch.stack([positions, torch.arange(19, device=device)])
    losses, grads = [], []
    for model, backend in ((ref, "torch"), (tri, "triton")):
        with kernels.use_backend(backend):
            out = model(ids, targets=targets, segment_ids=segments, position_ids=positions)
            out.loss.backward()
        losses.append(out.loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=TOL)
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) < TOL, name


def test_backend_triton_really_runs_the_kernels(monkeypatch):
    called = []
    for op, fn in list(kernels.ops._TRITON_OPS.items()):
        monkeypatch.setitem(kernels.ops._TRITON_OPS, op, lambda *a, _fn=fn, _op=op: called.append(_op) or _fn(*a))
    model = DenseLM(make_config("dense", "micro", vocab_size=64))  # built under the default backend
    with kernels.use_backend("triton"):
        model(torch.randint(0, 64, (1, 5)))
    assert set(called) == {"rms_norm", "swiglu", "apply_rope"}
    called.clear()
    with kernels.use_backend("torch"):
        model(torch.randint(0, 64, (1, 5)))
    assert called == []


@pytest.mark.slow
def test_apply_to_transformers_keeps_qwen2_logits_and_gradients(monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    called = set()
    for op, fn in list(kernels.ops._TRITON_OPS.items()):
        monkeypatch.setitem(kernels.ops._TRITON_OPS, op, lambda *a, _fn=fn, _op=op: called.add(_op) or _fn(*a))

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    plain = Qwen2ForCausalLM(cfg)
    patched = Qwen2ForCausalLM(cfg)
    patched.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 101, (2, 11))
    ref = plain(ids, labels=ids)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in plain.named_parameters()}
    import transformers.models.qwen2.modeling_qwen2 as modeling

    original_rope = modeling.apply_rotary_pos_emb
    try:
        counts = kernels.apply_to_transformers(patched, backend="triton")
        assert counts == {"rms_norm": 2 * 2 + 1, "swiglu": 2, "rope": 1}
        out = patched(ids, labels=ids)
        out.loss.backward()
    finally:
        modeling.apply_rotary_pos_emb = original_rope
    assert called == {"rms_norm", "swiglu", "apply_rope"}  # the kernels really ran
    assert rel_err(out.logits, ref.logits) < TOL
    for name, p in patched.named_parameters():
        assert rel_err(p.grad, ref_grads[name]) < TOL, name


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_moe_model_triton_equals_torch(packed):
    """MLA attention, MoE dispatch, RMSNorm, SwiGLU and RoPE kernels together in the DeepSeek-V3-style model."""
    from models import MoELM

    device = "cuda" if ON_GPU else "cpu"
    torch.manual_seed(0)
    kw = dict(vocab_size=97, n_routed_experts=7, num_experts_per_tok=3, n_shared_experts=1, initializer_range=0.1)
    ref = MoELM(make_config("moe", "micro", **kw)).to(device)
    tri = MoELM(make_config("moe", "micro", **kw)).to(device)
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 97, (2, 19), device=device)
    extra = {}
    if packed:
        extra["segment_ids"] = torch.tensor([[0] * 7 + [1] * 12, [0] * 19], device=device)
        pos = torch.cat([torch.arange(7), torch.arange(12)])
        extra["position_ids"] = torch.stack([pos, torch.arange(19)]).to(device)
    losses, grads = [], []
    for model, backend in ((ref, "torch"), (tri, "triton")):
        with kernels.use_backend(backend):
            out = model(ids, targets=torch.roll(ids, -1, 1), **extra)
            out.loss.backward()
        losses.append(out.loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert losses[1] == pytest.approx(losses[0], rel=TOL)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) < TOL, name


@pytest.mark.slow
def test_moe_model_generates_the_same_tokens_with_the_triton_decode_kernel():
    from models import MoELM
    from models.generate import generate

    torch.manual_seed(0)
    kw = dict(vocab_size=64, initializer_range=0.3)
    model = MoELM(make_config("moe", "micro", **kw)).eval()
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4]]
    with kernels.use_backend("triton"):
        tri = generate(model, prompts, 6, pad_id=0)
    with kernels.use_backend("torch"):
        ref = generate(model, prompts, 6, pad_id=0)
    assert tri == ref


def _few_records(src, dst, n):
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_kernels_option_runs_the_kernels_in_fine_tuning_stages(
    stage, sft_model_dir, synthetic_dir, tmp_path, monkeypatch
):
    """`sft/dpo --kernels triton` runs Triton ops (the model is built before the option applies), the
    checkpoint records the backend that ran, and the process's setting is back afterwards."""
    import json

    from train import dpo, sft

    called = set()
    for op, fn in list(kernels.ops._TRITON_OPS.items()):
        monkeypatch.setitem(kernels.ops._TRITON_OPS, op, lambda *a, _fn=fn, _op=op: called.add(_op) or _fn(*a))
    data = _few_records(synthetic_dir / f"{stage}_train.jsonl", tmp_path / "data.jsonl", 4)
    main = {"sft": sft.main, "dpo": dpo.main}[stage]
    extra = ["--reference", "model"] if stage == "dpo" else []
    summary = main(
        [
            "--init",
            str(sft_model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "1",
            "--eval-every",
            "0",
            "--no-progress",
            "--kernels",
            "triton",
            *extra,
        ]
    )
    assert {"rms_norm", "swiglu", "apply_rope"} <= called
    assert summary["kernels"] == "triton"
    args = json.loads((tmp_path / "run" / "checkpoints" / "step_0000001" / "train_args.json").read_text())
    assert args["kernels"] == "triton" and args["train"]["kernels"] == "triton"
    assert kernels.get_backend() == "auto"
