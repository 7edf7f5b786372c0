"""Triton RoPE (q and k in one launch) against the reference, both layouts, GQA and MLA's single
shared rope key, head dims 16..192, position offsets and packed (restarting) positions."""

import pytest
import torch
from kernel_testing import assert_close, devices_and_dtypes

from kernels.rope import apply_rope_reference, apply_rope_triton
from models.layers import RotaryEmbedding

POSITIONS = {
    "offset": lambda b, t: torch.arange(37, 37 + t).expand(b, t),  # a KV cache in front
    "packed": lambda b, t: torch.cat([torch.arange(3), torch.arange(t - 3)]).expand(b, t),  # documents restart
    "per_row": lambda b, t: torch.stack([torch.arange(t) + 5 * i for i in range(b)]),
}


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("head_dim,hq,hk", [(16, 4, 1), (32, 1, 1), (64, 6, 2), (128, 3, 3), (192, 2, 1)])
@pytest.mark.parametrize("positions", sorted(POSITIONS))
def test_rope_matches_reference(device, dtype, layout, head_dim, hq, hk, positions, poisoned):
    b, t = 2, 5
    pos = POSITIONS[positions](b, t).to(device)
    cos, sin = RotaryEmbedding(head_dim, 10000.0).to(device)(pos, dtype)
    # q as the usual transposed view of [B, T, H, D]; k contiguous
    q = torch.randn(b, t, hq, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, hk, t, head_dim, device=device, dtype=dtype, requires_grad=True)
    qo, ko = apply_rope_triton(q, k, cos, sin, layout)
    qr, kr = apply_rope_reference(q, k, cos, sin, layout)
    assert_close(qo, qr, dtype, "q")
    assert_close(ko, kr, dtype, "k")
    gq, gk = torch.randn_like(qr), torch.randn_like(kr)
    got = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    want = torch.autograd.grad((qr, kr), (q, k), (gq, gk))
    assert_close(got[0], want[0], dtype, "dq")
    assert_close(got[1], want[1], dtype, "dk")


def test_rope_needs_an_even_head_dim_and_a_known_layout():
    q = torch.randn(1, 1, 2, 6)
    cos = sin = torch.ones(1, 2, 6)
    with pytest.raises(ValueError, match="layout"):
        apply_rope_triton(q, q, cos, sin, "spiral")
    with pytest.raises(ValueError, match="even"):
        apply_rope_triton(q[..., :5], q[..., :5], cos[..., :5], sin[..., :5], "half")
