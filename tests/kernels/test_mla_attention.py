"""Triton MLA attention against the references of kernels/mla_attention.py: the training kernel's output and
the gradients of q_nope, q_rope, k_nope, the shared k_rope and v (causal, packed sequences from cumulative
lengths, an explicit mask, a KV-cache offset), and the split-cache decode kernel."""

import pytest
import torch
from kernel_testing import ON_GPU, assert_close_dot, devices_and_dtypes

from kernels.mla_attention import mla_attention_reference, mla_decode_reference, seq_start_from_cu_seqlens
from kernels.mla_attention_triton import mla_attention_triton, mla_decode_triton


def _inputs(b, h, t, s, dn, dr, dv, device, dtype):
    def r(*shape):
        return torch.randn(*shape, device=device).to(dtype).requires_grad_()

    return r(b, h, t, dn), r(b, h, t, dr), r(b, h, s, dn), r(b, 1, s, dr), r(b, h, s, dv)


def _compare(inputs, dtype, scale, mask_for_ref, **kernel_kw):
    out = mla_attention_triton(*inputs, scale, **kernel_kw)
    ref = mla_attention_reference(*inputs, scale, mask=mask_for_ref)
    assert_close_dot(out, ref, dtype, "output")
    dout = torch.randn_like(ref)
    got, want = torch.autograd.grad(out, inputs, dout), torch.autograd.grad(ref, inputs, dout)
    for g, w, what in zip(got, want, ("dq_nope", "dq_rope", "dk_nope", "dk_rope", "dv")):
        assert_close_dot(g, w, dtype, what)


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize(
    "b,h,t,dn,dr,dv",
    [
        (1, 1, 1, 16, 8, 16),  # one token, one head
        pytest.param(2, 3, 37, 24, 8, 20, marks=pytest.mark.slow),  # T not a multiple of the block; v dim != qk dim
        pytest.param(1, 8, 20, 32, 16, 32, marks=pytest.mark.slow),  # eight heads
        (1, 2, 33, 48, 16, 32),  # DeepSeek's proportions (nope > v, rope = nope / 3), shrunk
    ],
)
def test_causal_attention_matches_reference(device, dtype, b, h, t, dn, dr, dv, poisoned):
    torch.manual_seed(t + h)
    _compare(_inputs(b, h, t, t, dn, dr, dv, device, dtype), dtype, (dn + dr) ** -0.5, None)


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
def test_packed_sequences_from_cumulative_lengths(device, dtype, poisoned):
    torch.manual_seed(1)
    t = 45
    cu = torch.tensor([0, 1, 18, 19, 45], device=device)  # lengths 1, 17, 1, 26
    start = seq_start_from_cu_seqlens(cu, t)
    assert start.tolist() == [[0] + [1] * 17 + [18] + [19] * 26]
    pos = torch.arange(t, device=device)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= start[0][:, None])
    _compare(_inputs(1, 3, t, t, 16, 8, 24, device, dtype), dtype, 0.2, mask[None, None], seq_start=start)


def test_public_op_takes_sequence_starts_on_both_backends():
    import kernels

    device = "cuda" if ON_GPU else "cpu"
    torch.manual_seed(6)
    x = _inputs(2, 2, 21, 21, 16, 8, 16, device, torch.float32)
    start = kernels.seq_start_from_cu_seqlens(torch.tensor([0, 9, 21], device=device), 21).expand(2, 21)
    ref = kernels.mla_attention(*x, 0.3, seq_start=start, backend="torch")
    pos = torch.arange(21, device=device)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= start[0][:, None])
    torch.testing.assert_close(ref, mla_attention_reference(*x, 0.3, mask=mask[None, None]))
    if kernels.HAS_TRITON:
        assert_close_dot(kernels.mla_attention(*x, 0.3, seq_start=start, backend="triton"), ref, torch.float32, "out")


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
def test_explicit_mask_with_padding_and_a_cache_offset(device, dtype, poisoned):
    torch.manual_seed(2)
    b, t, s = 2, 7, 30  # 7 queries after 23 cached positions
    pos_q, pos_k = torch.arange(t, device=device) + s - t, torch.arange(s, device=device)
    mask = (pos_k[None, :] <= pos_q[:, None])[None, None].repeat(b, 1, 1, 1)
    mask[1, :, :, :5] = False  # left padding in the second row
    _compare(_inputs(b, 2, t, s, 16, 8, 16, device, dtype), dtype, 0.25, mask, mask=mask)


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize(
    "b,h,t,s,r,splits",
    [
        (1, 1, 1, 1, 32, None),  # a one-token cache
        (2, 4, 1, 53, 40, 3),  # three splits of an odd cache length
        (1, 5, 1, 70, 64, None),  # splits chosen by the launcher
        (2, 2, 3, 29, 32, 2),  # three new tokens: causal at the end of the cache (an explicit mask)
    ],
)
def test_decode_over_the_latent_cache(device, dtype, b, h, t, s, r, splits, poisoned):
    torch.manual_seed(s)
    ql, qr = torch.randn(b, h, t, r, device=device, dtype=dtype), torch.randn(b, h, t, 16, device=device, dtype=dtype)
    c, kr = torch.randn(b, s, r, device=device, dtype=dtype), torch.randn(b, s, 16, device=device, dtype=dtype)
    scale = (r + 16) ** -0.5
    mask = None
    if t > 1:
        pos_q, pos_k = torch.arange(t, device=device) + s - t, torch.arange(s, device=device)
        mask = (pos_k[None, :] <= pos_q[:, None])[None, None]
    assert_close_dot(
        mla_decode_triton(ql, qr, c, kr, scale, mask=mask, num_splits=splits),
        mla_decode_reference(ql, qr, c, kr, scale, mask=mask),
        dtype,
        "decode",
    )


def test_decode_with_a_padding_mask():
    device = "cuda" if ON_GPU else "cpu"
    torch.manual_seed(4)
    ql, qr = torch.randn(2, 3, 1, 32, device=device), torch.randn(2, 3, 1, 8, device=device)
    c, kr = torch.randn(2, 40, 32, device=device), torch.randn(2, 40, 8, device=device)
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool, device=device)
    mask[0, ..., :17] = False
    assert_close_dot(
        mla_decode_triton(ql, qr, c, kr, 0.2, mask=mask, num_splits=4),
        mla_decode_reference(ql, qr, c, kr, 0.2, mask=mask),
        torch.float32,
        "decode",
    )
