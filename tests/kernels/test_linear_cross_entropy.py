"""Fused linear + cross-entropy (kernels/linear_cross_entropy.py): the Triton row kernel and the chunked
PyTorch reference against F.cross_entropy (+ z-loss) on materialised logits, loss and both gradients,
for every reduction, with label smoothing, ignored rows and chunks that do not divide the rows."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_close, devices_and_dtypes

import kernels
from kernels.linear_cross_entropy import (
    chunk_rows,
    linear_cross_entropy_reference,
    linear_cross_entropy_triton,
)

IGNORE = -100


def materialised(h, w, t, eps, z, reduction):
    """The unfused oracle: logits in fp32, F.cross_entropy, z * lse^2 on the rows not ignored."""
    x = (h.float() @ w.float().t()).view(-1, w.shape[0])
    t = t.reshape(-1)
    keep = t != IGNORE
    loss = F.cross_entropy(x, t, ignore_index=IGNORE, label_smoothing=eps, reduction="none")
    loss = loss + z * torch.logsumexp(x, -1) ** 2 * keep
    if reduction == "mean":
        return loss.sum() / keep.sum().clamp(min=1)
    return loss.sum() if reduction == "sum" else loss.view(h.shape[:-1])


CASES = [  # (leading shape of h, hidden, vocab, chunk, label smoothing, z-loss)
    ((2, 19), 24, 301, 8, 0.0, 0.0),  # vocab not a power of 2, chunks leave a ragged tail
    ((1,), 16, 97, None, 0.1, 0.0),  # one row
    ((33,), 40, 5000, 16, 0.0, 1e-3),  # vocab over one 4096 block: the online log-sum-exp across blocks
    ((3, 5), 8, 64, 4, 0.2, 1e-2),
]


@pytest.mark.parametrize("device,dtype", devices_and_dtypes())
@pytest.mark.parametrize("lead,hidden,vocab,chunk,eps,z", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_materialised_cross_entropy(device, dtype, lead, hidden, vocab, chunk, eps, z, reduction, poisoned):
    torch.manual_seed(0)
    h = torch.randn(*lead, hidden, device=device).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(vocab, hidden, device=device)).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, lead, device=device)
    t.view(-1)[::3] = IGNORE
    ref = materialised(h, w, t, eps, z, reduction)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (h, w), g)
    for fn in (linear_cross_entropy_triton, linear_cross_entropy_reference):
        out = fn(h, w, t, IGNORE, eps, z, reduction, chunk)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert_close(out, ref.float(), dtype, f"{fn.__name__} loss")
        got = torch.autograd.grad(out, (h, w), g)
        for a, b, what in zip(got, want, ("d hidden", "d weight")):
            assert_close(a, b, dtype, f"{fn.__name__} {what}")


@pytest.mark.parametrize("fn", [linear_cross_entropy_triton, linear_cross_entropy_reference])
def test_every_row_ignored_gives_zero_loss_and_gradients(fn):
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    t = torch.full((6,), IGNORE)
    for reduction in ("mean", "sum"):
        out = fn(h, w, t, reduction=reduction)
        dh, dw = torch.autograd.grad(out, (h, w))
        assert out.item() == 0.0 and not dh.any() and not dw.any()


def test_backend_switch_runs_the_triton_kernel(monkeypatch):
    lce = importlib.import_module("kernels.linear_cross_entropy")  # the module (kernels.<name> is the op)
    called = []
    real = lce.ce_rows_triton
    monkeypatch.setattr(lce, "ce_rows_triton", lambda *a: called.append(1) or real(*a))
    h, w, t = torch.randn(4, 8), torch.randn(20, 8), torch.randint(0, 20, (4,))
    with kernels.use_backend("triton"):
        a = kernels.linear_cross_entropy(h, w, t)
    assert called
    called.clear()
    with kernels.use_backend("torch"):
        b = kernels.linear_cross_entropy(h, w, t)
    assert not called and torch.allclose(a, b, rtol=1e-6)


def test_autocast_runs_the_matmuls_in_its_dtype_and_the_loss_in_fp32():
    h = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.linear_cross_entropy(h, w, t, backend="torch")
    out.backward()
    assert out.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    ref = materialised(h.bfloat16(), w.bfloat16(), t, 0.0, 0.0, "mean")
    assert abs(out.item() - ref.item()) < 1e-2 * ref.item()


def test_no_grad_computes_no_gradients_and_bad_targets_are_clear():
    h, w = torch.randn(5, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    with torch.no_grad():
        out = kernels.linear_cross_entropy(h, w, torch.randint(0, 30, (5,)))
    assert not out.requires_grad
    with pytest.raises(ValueError, match="target 30 is outside the vocabulary of 30"):
        kernels.linear_cross_entropy(h, w, torch.tensor([1, 2, 30, IGNORE, 0]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        kernels.linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long), reduction="avg")


def test_chunks_hold_a_bounded_number_of_logits():
    assert chunk_rows(8192, 151_936) == 128 and chunk_rows(8192, 32_000) == 1024
    assert chunk_rows(3, 32_000) == 3 and chunk_rows(10, 1 << 30) == 1
