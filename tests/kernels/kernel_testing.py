"""What the kernel tests share: devices and dtypes to run on, the tolerance table, output poisoning,
and the relative-error measure."""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED

# ||out - ref|| / ||ref|| allowed, per dtype (docs/kernels.md). Elementwise and row ops: no tf32 anywhere.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Kernels built on tl.dot (attention, grouped GEMMs): fp32 dots run as tf32 on a GPU (docs/kernels.md: 1e-3),
# the summation order differs from the reference's, and gradients pass through chained products.
DOT_TOLERANCE = {**TOLERANCE, torch.float32: 1e-3 if ON_GPU else 1e-5, torch.float16: 4e-3}


def devices_and_dtypes() -> list:
    """fp32 and fp16 on the interpreter (CPU); on a GPU (TRITON_INTERPRET=0) also bf16."""
    if ON_GPU:
        return [("cuda", d) for d in (torch.float32, torch.float16, torch.bfloat16)]
    return [("cpu", torch.float32), ("cpu", torch.float16)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str, table=TOLERANCE) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    assert not torch.isnan(out).any(), f"{what}: NaN (an element was never written, or the math broke)"
    err = rel_err(out, ref)
    assert err <= table[dtype], f"{what}: relative error {err:.2e} > {table[dtype]:.0e}"


def assert_close_dot(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert_close(out, ref, dtype, what, DOT_TOLERANCE)


@pytest.fixture
def poisoned(monkeypatch):
    """Every float buffer a kernel allocates starts as NaN, so an element it fails to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    yield


def grads(outputs, inputs, grad_outputs):
    return torch.autograd.grad(outputs, inputs, grad_outputs)
