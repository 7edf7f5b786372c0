"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight.

Casting follows Qwen2's RMSNorm exactly: normalize in fp32, cast to the input dtype, then multiply
by the weight. The Triton kernels (issue: Triton kernels I) sit beside this reference.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)
