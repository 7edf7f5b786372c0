"""Which implementation of an op runs: the Triton kernel or the PyTorch reference.

One setting for the whole process, never part of a model:
- `auto` (the default): Triton on CUDA tensors, the reference elsewhere;
- `triton`: the kernels everywhere (on a CPU that needs TRITON_INTERPRET=1, the interpreter);
- `torch`: the references everywhere.

It starts from the environment variable LLM_SCRATCH_KERNELS when that is set, and changes with
`set_backend(name)` or, for a block of code, `with use_backend(name): ...`. The training stages'
`--kernels` option is `use_backend` around the whole stage. A model built under one setting runs under
any other: layers ask for the op, and the op asks this module which implementation to run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "LLM_SCRATCH_KERNELS"

_chosen: str | None = None  # set_backend / use_backend; None: the environment variable (or auto) applies


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def get_backend() -> str:
    """The process's setting: what set_backend/use_backend chose, else LLM_SCRATCH_KERNELS, else auto."""
    if _chosen is not None:
        return _chosen
    env = os.environ.get(ENV_VAR)
    if not env:
        return "auto"
    try:
        return check_backend(env)
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}: {e}") from None


def set_backend(name: str | None) -> str | None:
    """Set the process's backend (None: back to the environment variable or auto); returns the previous
    explicit choice, for restoring it."""
    global _chosen
    previous = _chosen
    _chosen = None if name is None else check_backend(name)
    return previous


@contextmanager
def use_backend(name: str | None) -> Iterator[str]:
    """`with use_backend("triton"): ...` runs every op in the block on that backend (None changes nothing)."""
    previous = set_backend(name) if name is not None else _chosen
    try:
        yield get_backend()
    finally:
        set_backend(previous)


def resolve_backend(x: torch.Tensor, requested: str | None = None) -> str:
    """The concrete backend ('triton' or 'torch') for an op on tensor `x`: `requested` when a caller names
    one (benchmarks compare both in one process), else the process's setting."""
    name = check_backend(requested) if requested is not None else get_backend()
    if name == "auto":
        return "triton" if x.is_cuda else "torch"
    return name
