"""Expert parallelism: the routed experts of every MoE block are split across the ranks of a process
group; each token travels to the rank holding its expert and back with two all-to-alls.

With P ranks in the group, rank r holds experts [r E/P, (r+1) E/P). Per MoE block and forward:
1. route locally (the router is replicated), sort the (token, slot) assignments by expert;
2. exchange the per-expert counts (all-to-all), then the token rows (all-to-all);
3. group the received rows by local expert and run the grouped expert MLP;
4. send the results back (all-to-all) and combine them with the routing weights at the source.
Both all-to-alls are differentiable (the backward of an all-to-all is the all-to-all with the splits
swapped), so gradients reach the expert weights on their owning rank from every rank's tokens.
Gradient reduction (expert grads are not all-reduced with the dense ones) is the engine's job:
see train/engine/torch_engine.py.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

import kernels


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def shard_experts(model: nn.Module, group, rank: int, size: int) -> None:
    """Keep only this rank's slice of every MoE block's routed experts."""
    for block in model.moe_blocks():
        ex = block.experts
        if ex.n_routed_experts % size:
            raise ValueError(
                f"n_routed_experts ({ex.n_routed_experts}) must be divisible by the expert-parallel size ({size})"
            )
        n = ex.n_routed_experts // size
        lo = rank * n
        ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.detach()[lo : lo + n].clone())
        ex.down_proj = nn.Parameter(ex.down_proj.detach()[lo : lo + n].clone())
        ex.offset, ex.ep_group = lo, group


def expert_parameter_names(model: nn.Module) -> list[str]:
    return [
        name for name, _ in model.named_parameters() if name.endswith(("experts.gate_up_proj", "experts.down_proj"))
    ]


def gather_experts(model: nn.Module, state: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """The full state dict from a sharded model's: every rank calls it; expert slices are concatenated."""
    size = dist.get_world_size(group)
    for name in expert_parameter_names(model):
        local = state[name].contiguous()
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local, group=group)
        state[name] = torch.cat(parts)
    return state


def expert_parallel_experts(x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, ex) -> torch.Tensor:
    group = ex.ep_group
    size = dist.get_world_size(group)
    n_local = ex.gate_up_proj.shape[0]
    order, counts = kernels.moe_permute(idx, ex.n_routed_experts)
    x_sorted = x[order // idx.shape[1]]
    # how many rows each rank sends to each of our local experts
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv_counts = recv_counts.view(size, n_local)  # [source rank, local expert]
    send_splits = counts.view(size, n_local).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    x_recv = all_to_all(x_sorted, recv_splits, send_splits, group)
    # rows arrive grouped by source rank, then expert; regroup them by local expert
    local_expert = torch.repeat_interleave(torch.arange(n_local, device=x.device).repeat(size), recv_counts.reshape(-1))
    regroup = torch.argsort(local_expert, stable=True)
    y = kernels.grouped_mlp(x_recv[regroup], recv_counts.sum(0), ex.gate_up_proj, ex.down_proj)
    y_recv = torch.empty_like(y)
    y_recv[regroup] = y
    y_sorted = all_to_all(y_recv, send_splits, recv_splits, group)
    return kernels.moe_combine(y_sorted, order, weight)
