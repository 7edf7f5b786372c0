"""Triton MoE dispatch (permute, grouped gate/up GEMM with SwiGLU, grouped down GEMM, combine) against
the per-expert loop of kernels/moe_dispatch.py: the output and every gradient (x, routing weights, both
expert weight tensors), at odd shapes, with experts that get no tokens and fewer tokens than a tile."""

import pytest
import torch
from kernel_testing import ON_GPU, assert_close_dot, devices_and_dtypes, rel_err

import kernels
from kernels.moe_dispatch import grouped_mlp_reference, moe_experts_reference, moe_permute
from kernels.moe_dispatch_triton import dispatch, grouped_mlp_triton, moe_experts_triton, moe_permute_triton


def _routing(n, e, k, device, empty=()):
    """Top-k distinct experts per token; the experts in `empty` receive nothing."""
    allowed = torch.tensor([i for i in range(e) if i not in empty])
    rows = [allowed[torch.randperm(len(allowed))[:k]] for _ in range(n)]
    idx = (torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)).to(device)
    weight = torch.rand(n, k, device=device) + 0.1
    return idx, weight


def _weights(e, hidden, inter, device, dtype):
    w_gate_up = (torch.randn(e, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_()
    w_down = (torch.randn(e, hidden, inter, device=device) / inter**0.5).to(dtype).requires_grad_()
    return w_gate_up, w_down


@pytest.mark.parametrize(
    "n,e,k,empty", [(1, 1, 1, ()), (37, 7, 3, (5,)), (300, 13, 4, (0, 12)), (6, 64, 2, ()), (0, 5, 2, ())]
)
def test_dispatch_is_the_stable_sort_by_expert(n, e, k, empty):
    device = "cuda" if ON_GPU else "cpu"
    idx, _ = _routing(n, e, k, device, empty)
    order, counts = moe_permute_triton(idx, e)
    want_order, want_counts = moe_permute(idx, e)
    assert torch.equal(counts, want_counts)
    assert torch.equal(order, want_order)
    d = dispatch(idx, e, 16)
    assert torch.equal(d.order[d.place_of.long()].long(), torch.arange(n * k, device=device))  # inverse
    tiles = (want_counts + 15) // 16
    assert torch.equal(d.tile_start[:e].long(), torch.cumsum(tiles, 0) - tiles)
    assert int(d.tile_start[d.e_pad]) == int(tiles.sum())


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize(
    "n,hidden,inter,e,k,empty",
    [
        (1, 16, 8, 3, 1, ()),  # one token
        pytest.param(37, 48, 40, 7, 3, (5,), marks=pytest.mark.slow),  # prime expert count, an expert without tokens
        pytest.param(23, 33, 20, 5, 4, (), marks=pytest.mark.slow),  # odd hidden and expert widths, top-4
        (9, 32, 24, 11, 2, (1, 2, 3)),  # fewer tokens than a tile for every expert
    ],
)
def test_moe_experts_match_the_loop(device, dtype, n, hidden, inter, e, k, empty, poisoned):
    torch.manual_seed(n + e)
    x = torch.randn(n, hidden, device=device, dtype=dtype, requires_grad=True)
    idx, weight = _routing(n, e, k, device, empty)
    weight = weight.to(dtype).requires_grad_()
    w_gate_up, w_down = _weights(e, hidden, inter, device, dtype)
    inputs = (x, weight, w_gate_up, w_down)
    out = moe_experts_triton(x, idx, weight, w_gate_up, w_down)
    ref = moe_experts_reference(x, idx, weight, w_gate_up, w_down)
    assert_close_dot(out, ref, dtype, "output")
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, dout)
    want = torch.autograd.grad(ref, inputs, dout)
    for g, w, what in zip(got, want, ("dx", "d routing weight", "d w_gate_up", "d w_down")):
        assert_close_dot(g, w, dtype, what)
    if empty:  # an expert that saw no token gets an exact zero gradient
        assert torch.all(got[2][list(empty)] == 0) and torch.all(got[3][list(empty)] == 0)


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
def test_grouped_mlp_on_presorted_rows(device, dtype, poisoned):
    torch.manual_seed(3)
    counts = torch.tensor([5, 0, 17, 1, 0], device=device)
    x = torch.randn(int(counts.sum()), 40, device=device, dtype=dtype, requires_grad=True)
    w_gate_up, w_down = _weights(5, 40, 24, device, dtype)
    out = grouped_mlp_triton(x, counts, w_gate_up, w_down)
    ref = grouped_mlp_reference(x, counts, w_gate_up, w_down)
    assert_close_dot(out, ref, dtype, "output")
    dy = torch.randn_like(ref)
    inputs = (x, w_gate_up, w_down)
    for g, w, what in zip(
        torch.autograd.grad(out, inputs, dy), torch.autograd.grad(ref, inputs, dy), ("dx", "d w_gate_up", "d w_down")
    ):
        assert_close_dot(g, w, dtype, what)


@pytest.mark.slow
def test_moe_experts_are_deterministic():
    device = "cuda" if ON_GPU else "cpu"
    torch.manual_seed(5)
    x = torch.randn(41, 32, device=device, requires_grad=True)
    idx, weight = _routing(41, 6, 2, device)
    w_gate_up, w_down = _weights(6, 32, 16, device, torch.float32)
    runs = []
    for _ in range(2):
        out = moe_experts_triton(x, idx, weight, w_gate_up, w_down)
        runs.append((out, *torch.autograd.grad(out.square().sum(), (x, w_gate_up, w_down))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_moe_layer_triton_equals_torch():
    """The DeepSeekMoE block (gate, shared expert, routed experts) through both backends."""
    from models import make_config
    from models.moe import DeepSeekMoE

    device = "cuda" if ON_GPU else "cpu"
    torch.manual_seed(0)
    kw = dict(vocab_size=64, n_routed_experts=7, num_experts_per_tok=3, n_group=1, topk_group=1, n_shared_experts=1)
    ref = DeepSeekMoE(make_config("moe", "micro", **kw)).to(device)
    tri = DeepSeekMoE(make_config("moe", "micro", **kw)).to(device)
    for p in ref.parameters():  # the block alone is not initialised (the model's init_weights does that)
        torch.nn.init.normal_(p, std=0.2)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 11, ref.gate.weight.shape[1], device=device)
    outs, grads = [], []
    for m, backend in ((ref, "torch"), (tri, "triton")):
        with kernels.use_backend(backend):
            y, bal = m(x)
            loss = y.square().mean() + bal
            loss.backward()
        outs.append(y)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert rel_err(outs[1], outs[0]) < 2e-5
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g) < 2e-5, name
