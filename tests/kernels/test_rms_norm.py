"""Triton RMSNorm against the PyTorch reference (itself pinned to transformers' Qwen2RMSNorm in
tests/test_kernels_api.py): output, input and weight gradients, odd shapes, chunked wide rows."""

import pytest
import torch
from kernel_testing import assert_close, devices_and_dtypes

from kernels.rms_norm import RMSNormFunction, rms_norm_reference

CASES = [
    # (leading shape, hidden, max_block): max_block forces the chunked (wide-row) path on small rows
    ((3, 5), 123, None),  # hidden 123 (not a power of two), rows 15
    ((1,), 123, None),  # one row
    ((7,), 64, None),  # rows not a multiple of the backward's program count
    ((2, 3), 300, 128),  # a row in three chunks of 128 (the last partial)
    ((4,), 3, None),  # a tiny hidden size
]


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("lead,hidden,max_block", CASES)
def test_rms_norm_matches_reference(device, dtype, lead, hidden, max_block, poisoned):
    x = torch.randn(*lead, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
    y = RMSNormFunction.apply(x, w, 1e-6, max_block)
    ref = rms_norm_reference(x, w, 1e-6)
    assert_close(y, ref, dtype, "output")
    dy = torch.randn_like(ref)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    rdx, rdw = torch.autograd.grad(ref, (x, w), dy)
    assert_close(dx, rdx, dtype, "d input")
    assert_close(dw, rdw, dtype, "d weight")


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
def test_rms_norm_non_contiguous_input_and_fp32_weight(device, dtype):
    base = torch.randn(6, 2 * 77, device=device, dtype=dtype)
    x = base[:, ::2].requires_grad_()  # stride 2 along the hidden dim
    w = torch.randn(77, device=device, requires_grad=True)  # fp32 weight, as under autocast
    y = RMSNormFunction.apply(x, w, 1e-5)
    ref = rms_norm_reference(x, w, 1e-5)
    assert y.dtype == torch.float32  # promoted like transformers' weight * h.to(input dtype)
    assert_close(y, ref, dtype, "output")
    dy = torch.randn_like(ref)
    for a, b, what in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(ref, (x, w), dy), ("dx", "dw")):
        assert_close(a, b, dtype, what)


def test_weight_gradient_is_deterministic():
    x = torch.randn(37, 50, requires_grad=True)
    w = torch.randn(50, requires_grad=True)
    dy = torch.randn(37, 50)
    first = torch.autograd.grad(RMSNormFunction.apply(x, w, 1e-6), w, dy)[0]
    again = torch.autograd.grad(RMSNormFunction.apply(x, w, 1e-6), w, dy)[0]
    assert torch.equal(first, again)
