"""Hand-written Triton kernels, each beside its PyTorch reference, behind one API the models call
(kernels/ops.py). Which one runs is a runtime setting of the process (kernels/backend.py: `use_backend`,
`set_backend`, LLM_SCRATCH_KERNELS), never part of a model.

One op per file: rms_norm.py, swiglu.py, rope.py, linear_cross_entropy.py, mla_attention.py
(+ mla_attention_triton.py), moe_dispatch.py (+ moe_dispatch_triton.py); the math of each reference is
on one page, docs/ops.md.
The references are the fallback and the test oracle. Asking for Triton where it is not installed is an
error, never a silent fallback, so a benchmark or test never measures the wrong thing.
"""

from __future__ import annotations

from ._triton import HAS_TRITON
from .backend import BACKENDS, ENV_VAR, check_backend, get_backend, resolve_backend, set_backend, use_backend
from .mla_attention import seq_start_from_cu_seqlens, seq_start_from_segments, sequence_mask
from .moe_dispatch import moe_combine, moe_permute
from .ops import apply_rope, grouped_mlp, linear_cross_entropy, mla_attention, mla_decode, moe_experts, rms_norm, swiglu
from .rope import LAYOUTS
from .transformers_patch import apply_to_transformers

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "HAS_TRITON",
    "LAYOUTS",
    "apply_rope",
    "apply_to_transformers",
    "check_backend",
    "get_backend",
    "grouped_mlp",
    "linear_cross_entropy",
    "mla_attention",
    "mla_decode",
    "moe_combine",
    "moe_experts",
    "moe_permute",
    "resolve_backend",
    "rms_norm",
    "seq_start_from_cu_seqlens",
    "seq_start_from_segments",
    "sequence_mask",
    "set_backend",
    "swiglu",
    "use_backend",
]
