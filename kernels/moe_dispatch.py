"""MoE token dispatch: routed tokens -> grouped by expert -> each expert's SwiGLU MLP -> weighted
combine back into token order.

Inputs: x [N, H] tokens; topk_idx [N, K] expert ids; topk_weight [N, K] routing weights;
w_gate_up [E, 2I, H] (rows 0..I-1 the gate, I..2I-1 the up projection); w_down [E, H, I].

Three steps, each usable on its own (expert parallelism sends the grouped tokens to other ranks
between them):
- `moe_permute(topk_idx, E)` -> (order, counts): the (token, slot) assignments sorted by expert
  (stable, so ties keep token order) and the number of assignments per expert;
- `grouped_mlp(x_sorted, counts, w_gate_up, w_down)`: rows of expert e are the counts[e] rows after
  those of experts < e; each goes through its expert's SwiGLU MLP;
- `moe_combine(y_sorted, order, topk_weight)`: un-permute and sum each token's K outputs weighted by
  its routing weights, as a gather and a fixed-order sum (deterministic: no atomics, no index_add).

The PyTorch references are the per-expert loop (the fallback and the oracle for the Triton kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_permute(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = topk_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def grouped_mlp_reference(
    x_sorted: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    inter = w_down.shape[-1]
    outs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        xe = x_sorted[start : start + n]
        gate_up = F.linear(xe, w_gate_up[e])
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        outs.append(F.linear(h, w_down[e]))
        start += n
    if not outs:
        return x_sorted.new_zeros(0, w_down.shape[1])
    return torch.cat(outs)


def moe_combine(y_sorted: torch.Tensor, order: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
    n, k = topk_weight.shape
    rows = torch.empty_like(y_sorted)
    rows[order] = y_sorted  # back to (token, slot) order
    weighted = rows.view(n, k, -1).float() * topk_weight.float().unsqueeze(-1)
    return weighted.sum(1).to(y_sorted.dtype)


def moe_experts_reference(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    order, counts = moe_permute(topk_idx, w_gate_up.shape[0])
    x_sorted = x[order // topk_idx.shape[1]]
    return moe_combine(grouped_mlp_reference(x_sorted, counts, w_gate_up, w_down), order, topk_weight)
