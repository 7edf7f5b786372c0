"""DeepSeek-V3-style mixture-of-experts decoder: Multi-head Latent Attention (models/mla.py) and
DeepSeekMoE. Parameter names are transformers' DeepseekV3 names (routed experts held as two 3-D
tensors, as transformers 5 holds them in memory), so conversion is a rename table (models/hf_moe.py).

DeepSeekMoE (DeepSeek-V3 sec. 2.1.2). The first `first_k_dense_replace` layers have a dense SwiGLU MLP;
the others have `n_shared_experts` always-on experts (one SwiGLU MLP of their combined width) plus
`n_routed_experts` small routed experts, of which each token uses `num_experts_per_tok`:
- scores s = sigmoid(x W_gate^T) (fp32);
- choice: s + b, where b is `e_score_correction_bias`, used only to choose; experts fall into `n_group`
  groups, each group scored by the sum of its two best choice scores, only the best `topk_group`
  groups compete, and the top-k experts of those are taken;
- weights: the chosen experts' unbiased s, normalised to sum to 1 if `norm_topk_prob`, times
  `routed_scaling_factor`.

Load balancing without an auxiliary loss: the trainer calls `after_optimizer_step` after every step, which
moves each b_i by gamma = `bias_update_speed` towards balance: b_i += gamma * sign(mean load - load_i),
with loads counted over the step's tokens on every rank. The sequence-wise balance loss
alpha * sum_i f_i P_i (f_i: the fraction of the row's top-k picks that went to i, times E/K; P_i: the
row's mean of s_i / sum_j s_j) is added to the training loss, averaged over rows.

Multi-token prediction (sec. 2.2), depth 1 when `num_mtp_layers` = 1: position i's final hidden state
and the embedding of token i+1 are normalised, concatenated, projected back to the hidden size and
passed through one more decoder layer; the shared head then predicts token i+2. Its loss enters the
training loss with weight `mtp_loss_weight`; generation does not use it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .base import IGNORE_INDEX, CausalLMBase, next_token_loss
from .config import MoEConfig
from .layers import RMSNorm, RotaryEmbedding, SwiGLUMLP
from .mla import LatentKVCache, MultiheadLatentAttention
from .output import ModelOutput


class MoEGate(nn.Module):
    """The router: fp32 weight [E, H] and the selection-only bias `e_score_correction_bias` [E]."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        c = config
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
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
        idx = choice.topk(self.top_k, dim=-1).indices
        weight = scores.gather(1, idx)
        if self.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return idx, weight * self.routed_scaling_factor, scores


class RoutedExperts(nn.Module):
    """The routed experts' weights as two 3-D tensors: gate_up_proj [E, 2I, H] (gate rows first) and
    down_proj [E, H, I]. Under expert parallelism a rank holds experts [offset, offset + E_local)."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.num_experts = num_experts  # all experts, on every rank
        self.offset = 0
        self.ep_group = None  # the expert-parallel process group, when sharded


class DeepSeekMoE(nn.Module):
    """Shared experts + routed experts. Records per-expert token counts while training (for the bias
    update) and returns the row-averaged sequence-wise balance statistic sum_i f_i P_i (None when not
    asked for: generation has no loss to add it to)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        c = config
        self.num_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.backend = c.kernel_backend
        self.gate = MoEGate(c)
        self.experts = RoutedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (SwiGLUMLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, c.kernel_backend)
                               if c.n_shared_experts else None)
        self.load: torch.Tensor | None = None  # tokens per expert since the last bias update (not a buffer:
        # DDP would overwrite every rank's counts with rank 0's)

    def routed(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ex = self.experts
        if ex.ep_group is not None:
            from .expert_parallel import expert_parallel_experts

            return expert_parallel_experts(x, idx, weight, ex, self.backend)
        return kernels.moe_experts(x, idx, weight, ex.gate_up_proj, ex.down_proj, backend=self.backend)

    def forward(self, x: torch.Tensor, with_balance: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        idx, weight, scores = self.gate(flat)
        y = self.routed(flat, idx, weight).view(b, t, h)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training and torch.is_grad_enabled():
            counts = torch.bincount(idx.reshape(-1), minlength=self.num_experts).float()
            self.load = counts if self.load is None else self.load + counts
        if not with_balance:  # generation: no loss to add it to
            return y, None
        return y, self.balance_statistic(idx.view(b, t, -1), scores.view(b, t, -1))

    def balance_statistic(self, idx: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """mean over rows of sum_i f_i P_i (DeepSeek-V3 eqs. 17-20, before the factor alpha)."""
        b, t, k = idx.shape
        e = self.num_experts
        picks = torch.zeros(b, e, device=idx.device).scatter_add_(1, idx.reshape(b, -1), torch.ones(b, t * k,
                                                                                                  device=idx.device))
        f = picks * e / (k * t)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)
        return (f * p).sum(-1).mean()

    @torch.no_grad()
    def update_bias(self, speed: float, reduce) -> float | None:
        """b += speed * sign(mean load - load) from the counts summed over ranks; returns max/mean load."""
        load = self.load if self.load is not None else torch.zeros(self.num_experts,
                                                                  device=self.gate.weight.device)
        load = reduce(load.clone())  # every rank takes part, even one whose counts are empty
        self.load = None
        if float(load.sum()) == 0:
            return None
        bias = self.gate.e_score_correction_bias
        bias += speed * torch.sign(load.mean() - load).to(bias.dtype)
        return float(load.max() / load.mean())


class MoEDecoderLayer(nn.Module):
    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.kernel_backend)
        self.self_attn = MultiheadLatentAttention(c, layer_idx)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.kernel_backend)
        self.is_moe = layer_idx >= c.first_k_dense_replace
        self.mlp = DeepSeekMoE(c) if self.is_moe else SwiGLUMLP(c.hidden_size, c.intermediate_size, c.kernel_backend)

    def forward(self, x, cos, sin, mask=None, kv_cache=None,
                with_balance: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, balance = self.mlp(h, with_balance)
            return x + y, balance
        return x + self.mlp(h), None


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3 sec. 2.2); the embedding and head are the model's."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        c = config
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.kernel_backend)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.kernel_backend)
        self.eh_proj = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.block = MoEDecoderLayer(c, c.num_hidden_layers)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.kernel_backend)


class MoEBackbone(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernel_backend)
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)


class MoELM(CausalLMBase):
    """Causal LM; the forward's loss is cross-entropy + alpha * balance loss (+ lambda * MTP loss while
    training), and `aux` carries the parts for logging."""

    config_class = MoEConfig
    zero3_leaf_modules = (DeepSeekMoE,)  # ZeRO-3 gathers a block's experts together (some may get no tokens)

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config.validate()
        self.model = MoEBackbone(config)
        self.add_lm_head()
        self.mtp = MTPModule(config) if config.num_mtp_layers else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.init_weights(lambda name: name.endswith(("layernorm.weight", "norm.weight")))

    def moe_blocks(self) -> list[DeepSeekMoE]:
        return [m for m in self.modules() if isinstance(m, DeepSeekMoE)]

    def make_kv_cache(self, batch: int, max_len: int, dtype=None, device=None) -> LatentKVCache:
        c = self.config
        w = self.model.embed_tokens.weight
        return LatentKVCache(c.num_hidden_layers, batch, c.kv_lora_rank, c.qk_rope_head_dim, max_len,
                             dtype or w.dtype, device or w.device)

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        c = self.config
        return c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim) * torch.finfo(dtype).bits // 8

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        kv_cache: LatentKVCache | None = None,
    ) -> ModelOutput:
        """As DenseLM.forward; with a cache, attention runs on the latent cache with absorbed weights."""
        h, cos, sin, mask = self.prepare(input_ids, inputs_embeds, attention_mask, position_ids, segment_ids,
                                         kv_cache)
        balances = []
        for layer in self.model.layers:
            h, balance = layer(h, cos, sin, mask, kv_cache, with_balance=targets is not None)
            if balance is not None:
                balances.append(balance)
        if kv_cache is not None:
            kv_cache.advance(h.shape[1])
        logits = self.lm_head(self.model.norm(h))
        if targets is None:
            return ModelOutput(logits=logits)
        lm = next_token_loss(logits, targets)
        balance = torch.stack(balances).sum() if balances else lm.new_zeros(())
        loss = lm + self.config.aux_loss_alpha * balance if self.training else lm
        aux = {"lm_loss": lm.detach(), "balance_loss": balance.detach()}
        if self.mtp is not None and input_ids is not None and h.shape[1] > 1:
            mtp_loss = self._mtp_loss(h, input_ids, targets, cos, sin, mask, segment_ids)
            aux["mtp_loss"] = mtp_loss.detach()
            if self.training:
                loss = loss + self.config.mtp_loss_weight * mtp_loss
        return ModelOutput(logits=logits, loss=loss, aux=aux)

    def _mtp_loss(self, h, input_ids, targets, cos, sin, mask, segment_ids) -> torch.Tensor:
        """Position i (i < T-1) sees its hidden state and token i+1, and predicts token i+2."""
        m = self.mtp
        emb = self.model.embed_tokens(input_ids[:, 1:])
        x = m.eh_proj(torch.cat((m.hnorm(h[:, :-1]), m.enorm(emb)), dim=-1))
        sub_mask = mask[..., :-1, :-1] if mask is not None else None
        x, _ = m.block(x, cos[:, :-1], sin[:, :-1], sub_mask)
        mtp_targets = targets[:, 1:]
        if segment_ids is not None:  # do not predict across a packed document boundary
            same = segment_ids[:, 1:] == segment_ids[:, :-1]
            mtp_targets = mtp_targets.masked_fill(~same, IGNORE_INDEX)
        return next_token_loss(self.lm_head(m.norm(x)), mtp_targets)

    @torch.no_grad()
    def after_optimizer_step(self, reduce) -> dict[str, float]:
        """The auxiliary-loss-free bias update; `reduce` sums a tensor over data-parallel ranks.
        Returns each MoE layer's max/mean expert load over the step (1.0 is perfect balance)."""
        stats = {}
        for i, block in enumerate(self.moe_blocks()):
            ratio = block.update_bias(self.config.bias_update_speed, reduce)
            if ratio is not None:
                stats[f"load_max_mean_{i}"] = ratio
        if stats:
            stats["load_max_mean"] = sum(stats.values()) / len(stats)
        return stats
