"""DeepSeek-V3-style decoder (transformers' `DeepseekV3ForCausalLM`): pre-norm blocks of Multi-head Latent
Attention (models/mla.py) and, after the first `first_k_dense_replace` layers with a dense SwiGLU MLP,
the DeepSeekMoE block (models/moe.py); RMSNorm throughout, DeepSeek's interleaved RoPE (optionally
YaRN-scaled). Parameter names are transformers' (models/convert/deepseek_v3.py converts).

The training loss is cross-entropy + alpha * the sequence-wise balance statistic of every MoE layer
(+ lambda * the MTP loss). After each optimizer step the trainer calls `after_optimizer_step`, which
runs each block's auxiliary-loss-free bias update.

Multi-token prediction (DeepSeek-V3 sec. 2.2), depth 1 when `num_mtp_layers` = 1: position i's final
hidden state and the embedding of token i+1 are normalised, concatenated, projected back to the hidden
size and passed through one more decoder layer; the shared head then predicts token i+2. Its loss enters
the training loss with weight `mtp_loss_weight`; generation does not use it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import IGNORE_INDEX, CausalLMBase, ModelOutput
from .config import MoEConfig
from .layers import PackedRows, RMSNorm, RotaryEmbedding, SwiGLUMLP
from .mla import LatentKVCache, MultiheadLatentAttention
from .moe import DeepSeekMoE


class MoEDecoderLayer(nn.Module):
    def __init__(self, config: MoEConfig, layer_idx: int):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = MultiheadLatentAttention(c, layer_idx)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.is_moe = layer_idx >= c.first_k_dense_replace
        self.mlp = DeepSeekMoE(c) if self.is_moe else SwiGLUMLP(c.hidden_size, c.intermediate_size)

    def forward(
        self, x, cos, sin, mask=None, kv_cache=None, with_balance: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        self.enorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.block = MoEDecoderLayer(c, c.num_hidden_layers)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class MoEBackbone(nn.Module):
    def __init__(self, config: MoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoEDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
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
        return LatentKVCache(
            c.num_hidden_layers,
            batch,
            c.kv_lora_rank,
            c.qk_rope_head_dim,
            max_len,
            dtype or w.dtype,
            device or w.device,
        )

    def packed_mode(self, x: torch.Tensor) -> bool | None:
        """Packed rows reach MLA as sequence starts (its kernel skips other documents' keys), everywhere."""
        return False

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
        token_logps: bool = False,
    ) -> ModelOutput:
        """As DenseLM.forward; with a cache, attention runs on the latent cache with absorbed weights."""
        h, cos, sin, mask = self.prepare(input_ids, inputs_embeds, attention_mask, position_ids, segment_ids, kv_cache)
        balances, training_loss = [], targets is not None and not token_logps
        for i, layer in enumerate(self.model.layers):
            h, balance = self.run_layer(i, layer, h, cos, sin, mask, kv_cache, with_balance=training_loss)
            if balance is not None:
                balances.append(balance)
        if kv_cache is not None:
            kv_cache.advance(h.shape[1])
        out = self.head_output(self.model.norm(h), targets, token_logps)
        if out.loss is None:
            return out
        lm = out.loss
        balance = torch.stack(balances).sum() if balances else lm.new_zeros(())
        loss = lm + self.config.aux_loss_alpha * balance if self.training else lm
        aux = {"lm_loss": lm.detach(), "balance_loss": balance.detach()}
        if self.mtp is not None and input_ids is not None and h.shape[1] > 1:
            mtp_loss = self._mtp_loss(h, input_ids, targets, cos, sin, mask, segment_ids)
            aux["mtp_loss"] = mtp_loss.detach()
            if self.training:
                loss = loss + self.config.mtp_loss_weight * mtp_loss
        return ModelOutput(loss=loss, aux=aux)

    def _mtp_loss(self, h, input_ids, targets, cos, sin, mask, segment_ids) -> torch.Tensor:
        """Position i (i < T-1) sees its hidden state and token i+1, and predicts token i+2."""
        m = self.mtp
        emb = self.model.embed_tokens(input_ids[:, 1:])
        x = m.eh_proj(torch.cat((m.hnorm(h[:, :-1]), m.enorm(emb)), dim=-1))
        if isinstance(mask, PackedRows):
            sub_mask = PackedRows(mask.seq_start[:, :-1])  # the first T-1 positions keep their starts
        else:
            sub_mask = mask[..., :-1, :-1] if mask is not None else None
        x, _ = m.block(x, cos[:, :-1], sin[:, :-1], sub_mask)
        mtp_targets = targets[:, 1:]
        if segment_ids is not None:  # do not predict across a packed document boundary
            same = segment_ids[:, 1:] == segment_ids[:, :-1]
            mtp_targets = mtp_targets.masked_fill(~same, IGNORE_INDEX)
        return self.lm_head(m.norm(x), mtp_targets)

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
