"""`apply_to_transformers(model)`: run a transformers Qwen2/Llama-style model's RMSNorms, SwiGLU MLPs and
rotary embedding through this package's ops (Liger-Kernel's idea, written here).

Norms and MLPs are patched per instance (their `forward`); the rotary function is a global of the
model's modeling module (`apply_rotary_pos_emb`), so it is replaced there, for every model of that
architecture in the process. The weights and the module tree are untouched, so a patched model loads,
saves and trains as before.
"""

from __future__ import annotations

import sys
import types

import torch

from .backend import check_backend
from .ops import apply_rope, rms_norm, swiglu


def apply_to_transformers(model: torch.nn.Module, backend: str = "triton") -> dict[str, int]:
    """Patch `model` in place; returns how many norms and MLPs were patched and whether rope was."""
    check_backend(backend)
    counts = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):

            def norm_forward(self, x):
                return rms_norm(x, self.weight, self.variance_epsilon, backend=backend)

            module.forward = types.MethodType(norm_forward, module)
            counts["rms_norm"] += 1
        elif all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")) and _is_silu(module):

            def mlp_forward(self, x):
                return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=backend))

            module.forward = types.MethodType(mlp_forward, module)
            counts["swiglu"] += 1
    modeling = sys.modules.get(type(model).__module__)
    if modeling is not None and hasattr(modeling, "apply_rotary_pos_emb"):

        def rotary(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            if unsqueeze_dim != 1:
                raise NotImplementedError("apply_to_transformers: rope expects [batch, heads, seq, dim] tensors")
            return apply_rope(q, k, cos, sin, layout="half", backend=backend)

        modeling.apply_rotary_pos_emb = rotary
        counts["rope"] = 1
    return counts


def _is_silu(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return act is not None and type(act).__name__ in ("SiLU", "SiLUActivation")
