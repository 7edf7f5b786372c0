"""Triton, when it is installed, and the launch settings the row kernels share.

Without triton (a platform PyPI has no wheel for) `triton.jit` leaves functions undecorated and
`HAS_TRITON` is False: the references still import and run, and asking for the Triton backend is an error.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    HAS_TRITON = False
    triton = SimpleNamespace(
        jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f),
        next_power_of_2=lambda n: 1 << max(0, int(n) - 1).bit_length(),
        cdiv=lambda a, b: -(-a // b),
    )
    tl = SimpleNamespace(constexpr=object)

MAX_ROW_BLOCK = 16384  # widest row a program holds in registers at once; wider rows are processed in chunks


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU, one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_block(n: int, max_block: int = MAX_ROW_BLOCK) -> int:
    return min(triton.next_power_of_2(max(n, 1)), max_block)


def num_warps_for(block: int) -> int:
    """Warps per program for a row of `block` elements (the rule the public row kernels use)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def programs_for_reduction(rows: int, device) -> int:
    """How many programs share the rows of a column reduction (RMSNorm's weight gradient): about
    four per SM on a GPU, a handful under the interpreter (each program costs milliseconds there)."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))
