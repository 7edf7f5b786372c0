"""Which implementation of an op runs: the Triton kernel or the PyTorch reference.

`auto` picks Triton on CUDA tensors and the reference elsewhere; `triton` forces the kernel (on CPU
that needs TRITON_INTERPRET=1); `torch` forces the reference. The model config sets a default,
the environment variable LLM_SCRATCH_KERNELS overrides it for a whole process.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LLM_SCRATCH_KERNELS"


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def requested_backend(requested: str | None) -> str:
    """The backend asked for: the environment variable wins over the config's value."""
    env = os.environ.get(ENV_VAR)
    return check_backend(env) if env else check_backend(requested or "auto")


def resolve_backend(requested: str | None, x: torch.Tensor) -> str:
    """Return the concrete backend ('triton' or 'torch') for an op on tensor `x`."""
    name = requested_backend(requested)
    if name == "auto":
        return "triton" if x.is_cuda else "torch"
    return name
