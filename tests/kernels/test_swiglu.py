"""Triton fused SwiGLU against silu(gate) * up: output and both input gradients."""

import pytest
import torch
from kernel_testing import assert_close, devices_and_dtypes

from kernels.swiglu import swiglu_reference, swiglu_triton


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("shape", [(4, 37), (1, 1), (3, 2, 1500), (9, 123)])
def test_swiglu_matches_reference(device, dtype, shape, poisoned):
    g = (2 * torch.randn(*shape, device=device)).to(dtype).requires_grad_()
    u = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    out, ref = swiglu_triton(g, u), swiglu_reference(g, u)
    assert_close(out, ref, dtype, "output")
    dc = torch.randn_like(ref)
    for a, b, what in zip(
        torch.autograd.grad(out, (g, u), dc), torch.autograd.grad(ref, (g, u), dc), ("d gate", "d up")
    ):
        assert_close(a, b, dtype, what)


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
def test_swiglu_on_halves_of_a_fused_projection(device, dtype):
    gate_up = torch.randn(5, 2 * 70, device=device, dtype=dtype, requires_grad=True)
    g, u = gate_up.chunk(2, dim=-1)  # strided views, no copy
    out, ref = swiglu_triton(g, u), swiglu_reference(g, u)
    assert_close(out, ref, dtype, "output")
    dc = torch.randn_like(ref)
    assert_close(torch.autograd.grad(out, gate_up, dc)[0], torch.autograd.grad(ref, gate_up, dc)[0], dtype, "grad")
