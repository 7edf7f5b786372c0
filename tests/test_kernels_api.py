"""The kernels package's public API and its runtime backend switch (the Triton kernels test themselves in
tests/kernels/); here the references are pinned against independent formulas."""

import pytest
import torch

import kernels
from kernels.rope import apply_rope_reference


def test_backend_is_a_process_setting_with_a_context_manager(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("LLM_SCRATCH_KERNELS", raising=False)
    assert kernels.get_backend() == "auto" and kernels.resolve_backend(cpu) == "torch"
    with kernels.use_backend("triton"):
        assert kernels.get_backend() == "triton" and kernels.resolve_backend(cpu) == "triton"
        with kernels.use_backend("torch"):  # nested blocks restore what was there
            assert kernels.resolve_backend(cpu) == "torch"
        assert kernels.resolve_backend(cpu) == "triton"
    assert kernels.get_backend() == "auto"
    assert kernels.resolve_backend(cpu, "triton") == "triton"  # a caller may name one for one call
    # the environment variable sets the process's default; an explicit choice wins over it
    monkeypatch.setenv("LLM_SCRATCH_KERNELS", "torch")
    assert kernels.resolve_backend(cpu) == "torch"
    with kernels.use_backend("triton"):
        assert kernels.resolve_backend(cpu) == "triton"
    monkeypatch.setenv("LLM_SCRATCH_KERNELS", "fast")
    with pytest.raises(ValueError, match="LLM_SCRATCH_KERNELS"):
        kernels.resolve_backend(cpu)
    with pytest.raises(ValueError, match="kernel backend"):
        kernels.set_backend("cuda")


def test_rms_norm_reference_matches_transformers_qwen2():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    x = torch.randn(3, 5, 123, dtype=torch.float16)
    norm = Qwen2RMSNorm(123, eps=1e-6).half()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(123))
    ours = kernels.rms_norm(x, norm.weight, 1e-6, backend="torch")
    assert ours.dtype == torch.float16
    assert torch.equal(ours, norm(x))


def test_swiglu_reference():
    g, u = torch.randn(4, 37), torch.randn(4, 37)
    torch.testing.assert_close(kernels.swiglu(g, u), g / (1 + torch.exp(-g)) * u)


def _rotate_pairs_by_hand(x, pos, theta=10000.0):
    """Interleaved RoPE written out per pair, as the RoFormer paper defines it."""
    d = x.shape[-1]
    out = torch.empty_like(x)
    for i in range(d // 2):
        ang = pos * theta ** (-2 * i / d)
        c, s = torch.cos(ang), torch.sin(ang)
        a, b = x[..., 2 * i], x[..., 2 * i + 1]
        out[..., 2 * i] = a * c - b * s
        out[..., 2 * i + 1] = b * c + a * s
    return out


def test_rope_layouts_against_hand_rotation():
    from models.layers import RotaryEmbedding

    b, t, d = 2, 7, 16
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [9, 10, 11, 40, 41, 42, 43]])
    cos, sin = RotaryEmbedding(d, 10000.0)(pos, torch.float32)
    q = torch.randn(b, 4, t, d, dtype=torch.float64).float()
    k = torch.randn(b, 1, t, d)  # one shared key head (GQA/MLA)
    qi, ki = apply_rope_reference(q, k, cos, sin, "interleaved")
    p = pos[:, None, :].float()
    torch.testing.assert_close(qi, _rotate_pairs_by_hand(q, p), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ki, _rotate_pairs_by_hand(k, p), rtol=1e-5, atol=1e-5)
    # the half layout is the interleaved one with dims permuted (evens first, then odds)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    qh, _ = apply_rope_reference(q[..., perm], k[..., perm], cos, sin, "half")
    torch.testing.assert_close(qh, qi[..., perm], rtol=1e-5, atol=1e-5)
