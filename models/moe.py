"""DeepSeekMoE (DeepSeek-V3 sec. 2.1.2): the mixture-of-experts block of the DeepSeek-V3-style model
(models/deepseek_v3.py): a router, the routed experts and the shared experts. Parameter names are
transformers' DeepseekV3 names (routed experts held as two 3-D tensors, as transformers 5 holds them in
memory), so conversion is a rename table (models/convert/deepseek_v3.py).

A layer with this block has `n_shared_experts` always-on experts (one SwiGLU MLP of their combined width)
plus `n_routed_experts` small routed experts, of which each token uses `num_experts_per_tok`:
- scores s = sigmoid(x W_gate^T) (fp32);
- choice: s + b, where b is `e_score_correction_bias`, used only to choose; experts fall into `n_group`
  groups, each group scored by the sum of its two best choice scores, only the best `topk_group`
  groups compete, and the top-k experts of those are taken;
- weights: the chosen experts' unbiased s, normalised to sum to 1 if `norm_topk_prob`, times
  `routed_scaling_factor`.
The routed experts run through `kernels.moe_experts` (dispatch, grouped SwiGLU MLPs, weighted combine),
or across ranks under expert parallelism (models/expert_parallel.py).

Load balancing without an auxiliary loss: after every optimizer step the model's `after_optimizer_step`
calls `update_bias`, which moves each b_i by gamma = `bias_update_speed` towards balance:
b_i += gamma * sign(mean load - load_i), with loads counted over the step's tokens on every rank. The
sequence-wise balance statistic sum_i f_i P_i (f_i: the fraction of the row's top-k picks that went to
i, times E/K; P_i: the row's mean of s_i / sum_j s_j), averaged over rows, enters the training loss
with weight alpha.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .base import in_recomputation
from .config import MoEConfig
from .layers import SwiGLUMLP


class MoEGate(nn.Module):
    """The router: fp32 weight [E, H] and the selection-only bias `e_score_correction_bias` [E]."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        c = config
        self.num_experts_per_tok, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts))

    def _apply(self, fn, recurse=True):
        # The bias moves by ~1e-3 per step: keep it fp32 when the model is cast to bf16/fp16 (as
        # transformers keeps it), or small updates would round away.
        super()._apply(fn, recurse)
        self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (top-k expert ids [N, K], their weights [N, K] fp32, all scores [N, E] fp32)."""
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        n, e = scores.shape
        choice = scores.detach() + self.e_score_correction_bias.float()
        if self.n_group > 1:
            group_scores = choice.view(n, self.n_group, -1).topk(2, dim=-1).values.sum(-1)  # [N, G]
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(e // self.n_group, dim=1), float("-inf"))
        idx = choice.topk(self.num_experts_per_tok, dim=-1).indices
        weight = scores.gather(1, idx)
        if self.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return idx, weight * self.routed_scaling_factor, scores


class RoutedExperts(nn.Module):
    """The routed experts' weights as two 3-D tensors: gate_up_proj [E, 2I, H] (gate rows first) and
    down_proj [E, H, I]. Under expert parallelism a rank holds experts [offset, offset + E_local)."""

    def __init__(self, n_routed_experts: int, hidden_size: int, moe_intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_routed_experts, 2 * moe_intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_routed_experts, hidden_size, moe_intermediate_size))
        self.n_routed_experts = n_routed_experts  # all experts, on every rank
        self.offset = 0
        self.ep_group = None  # the expert-parallel process group, when sharded


class DeepSeekMoE(nn.Module):
    """Shared experts + routed experts. Records per-expert token counts while training (for the bias
    update) and returns the row-averaged sequence-wise balance statistic sum_i f_i P_i (None when not
    asked for: generation has no loss to add it to)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        c = config
        self.n_routed_experts, self.num_experts_per_tok = c.n_routed_experts, c.num_experts_per_tok
        self.gate = MoEGate(c)
        self.experts = RoutedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (
            SwiGLUMLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts) if c.n_shared_experts else None
        )
        self.load: torch.Tensor | None = None  # tokens per expert since the last bias update (not a buffer:
        # DDP would overwrite every rank's counts with rank 0's)

    def routed(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        if ex.ep_group is not None:
            from .expert_parallel import expert_parallel_experts

            return expert_parallel_experts(x, idx, weight, ex)
        return kernels.moe_experts(x, idx, weight, ex.gate_up_proj, ex.down_proj)

    def forward(self, x: torch.Tensor, with_balance: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        idx, weight, scores = self.gate(flat)
        y = self.routed(flat, idx, weight).view(b, t, h)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training and torch.is_grad_enabled() and not in_recomputation():
            counts = torch.bincount(idx.reshape(-1), minlength=self.n_routed_experts).float()
            self.load = counts if self.load is None else self.load + counts
        if not with_balance:  # generation: no loss to add it to
            return y, None
        return y, self.balance_statistic(idx.view(b, t, -1), scores.view(b, t, -1))

    def balance_statistic(self, idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """mean over rows of sum_i f_i P_i (DeepSeek-V3 eqs. 17-20, before the factor alpha)."""
        b, t, k = idx.shape
        e = self.n_routed_experts
        picks = torch.zeros(b, e, device=idx.device).scatter_add_(
            1, idx.reshape(b, -1), torch.ones(b, t * k, device=idx.device)
        )
        f = picks * e / (k * t)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, speed: float, reduce) -> float | None:
        """b += speed * sign(mean load - load) from the counts summed over ranks; returns max/mean load."""
        load = (
            self.load if self.load is not None else torch.zeros(self.n_routed_experts, device=self.gate.weight.device)
        )
        load = reduce(load.clone())  # every rank takes part, even one whose counts are empty
        self.load = None
        if float(load.sum()) == 0:
            return None
        bias = self.gate.e_score_correction_bias
        bias += speed * torch.sign(load.mean() - load).to(bias.dtype)
        return float(load.max() / load.mean())
