"""The public ops the models call. Each runs its Triton kernel or its PyTorch reference, as the
process's backend setting says (kernels/backend.py), or as one call names (`backend="triton"`)."""

from __future__ import annotations

import torch

from ._triton import HAS_TRITON
from .backend import resolve_backend
from .linear_cross_entropy import linear_cross_entropy_reference, linear_cross_entropy_triton
from .mla_attention import mla_attention_reference, mla_decode_reference
from .mla_attention_triton import mla_attention_triton, mla_decode_triton
from .moe_dispatch import grouped_mlp_reference, moe_experts_reference
from .moe_dispatch_triton import grouped_mlp_triton, moe_experts_triton
from .rms_norm import rms_norm_reference, rms_norm_triton
from .rope import apply_rope_reference, apply_rope_triton
from .swiglu import swiglu_reference, swiglu_triton

# op name -> Triton implementation
_TRITON_OPS: dict[str, object] = (
    {
        "rms_norm": rms_norm_triton,
        "swiglu": swiglu_triton,
        "apply_rope": apply_rope_triton,
        "moe_experts": moe_experts_triton,
        "grouped_mlp": grouped_mlp_triton,
        "mla_attention": mla_attention_triton,
        "mla_decode": mla_decode_triton,
        "linear_cross_entropy": linear_cross_entropy_triton,
    }
    if HAS_TRITON
    else {}
)


def _dispatch(op: str, reference, backend: str | None, x: torch.Tensor):
    if resolve_backend(x, backend) != "triton":
        return reference
    if not HAS_TRITON:
        raise NotImplementedError(f"{op}: triton is not installed; use kernel backend 'torch' or 'auto'")
    return _TRITON_OPS[op]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str | None = None) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 statistics, Qwen2 casting)."""
    return _dispatch("rms_norm", rms_norm_reference, backend, x)(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """silu(gate) * up."""
    return _dispatch("swiglu", swiglu_reference, backend, gate)(gate, up)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str = "half",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by per-position cos/sin [B, T, D]."""
    return _dispatch("apply_rope", apply_rope_reference, backend, q)(q, k, cos, sin, layout)


def mla_attention(
    q_nope, q_rope, k_nope, k_rope, v, scale: float, mask=None, seq_start=None, backend: str | None = None
):
    """MLA attention with a shared rope key and a separate value head dim (see kernels/mla_attention.py).
    `seq_start` [B, T] (packed sequences: each token's sequence start, `seq_start_from_cu_seqlens`) in place
    of a mask: causal attention inside each sequence."""
    if seq_start is not None and mask is not None:
        raise ValueError("mla_attention: give a mask or seq_start, not both")
    return _dispatch("mla_attention", mla_attention_reference, backend, q_nope)(
        q_nope, q_rope, k_nope, k_rope, v, scale, mask, seq_start
    )


def mla_decode(q_latent, q_rope, c_kv, k_rope, scale: float, mask=None, backend: str | None = None):
    """Absorbed-query attention over the latent cache; returns the weighted latent [B, H, T, R]."""
    return _dispatch("mla_decode", mla_decode_reference, backend, q_latent)(q_latent, q_rope, c_kv, k_rope, scale, mask)


def grouped_mlp(x_sorted, counts, w_gate_up, w_down, backend: str | None = None):
    """Each expert's SwiGLU MLP over its contiguous rows of x_sorted (see kernels/moe_dispatch.py)."""
    return _dispatch("grouped_mlp", grouped_mlp_reference, backend, x_sorted)(x_sorted, counts, w_gate_up, w_down)


def moe_experts(x, topk_idx, topk_weight, w_gate_up, w_down, backend: str | None = None):
    """Routed experts: dispatch tokens to their top-k experts, run them, combine with the routing weights."""
    return _dispatch("moe_experts", moe_experts_reference, backend, x)(x, topk_idx, topk_weight, w_gate_up, w_down)


def linear_cross_entropy(
    h,
    weight,
    targets,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    backend: str | None = None,
):
    """Cross-entropy of the logits h @ weight^T against targets, computed a chunk of rows at a time without
    materialising the logits (kernels/linear_cross_entropy.py); reduction 'mean', 'sum' or 'none'."""
    return _dispatch("linear_cross_entropy", linear_cross_entropy_reference, backend, h)(
        h, weight, targets, ignore_index, label_smoothing, z_loss, reduction
    )
