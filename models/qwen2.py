"""Qwen2.5-style dense decoder (transformers' `Qwen2ForCausalLM`): pre-norm blocks of grouped-query
attention with q/k/v bias and rotate-half RoPE, and a SwiGLU MLP; RMSNorm throughout. Parameter names
are transformers' Qwen2 checkpoint keys, so export and import are a direct copy of the state dict
(models/convert/qwen2.py). The layers are in models/layers.py, the ops' math in docs/ops.md.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import IGNORE_INDEX, CausalLMBase, ModelOutput
from .config import DenseConfig
from .layers import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLUMLP, flash_attn_usable

__all__ = ["IGNORE_INDEX", "DenseLM"]


class DecoderLayer(nn.Module):
    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DenseBackbone(nn.Module):
    """Embeddings, decoder layers and the final norm (transformers' `Qwen2Model`)."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)


class DenseLM(CausalLMBase):
    """Causal language model; `forward` takes token ids (or embeddings, for the VLM) and returns logits."""

    config_class = DenseConfig

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config.validate()
        self.model = DenseBackbone(config)
        self.add_lm_head()
        self.reset_parameters()

    def packed_mode(self, x: torch.Tensor) -> bool | None:
        """Packed rows go to flash-attn's varlen kernel where it runs; elsewhere SDPA with the dense mask."""
        return True if flash_attn_usable(x) else None

    def reset_parameters(self) -> None:
        self.init_weights(lambda name: name.endswith("layernorm.weight") or name == "model.norm.weight")

    def make_kv_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        c = self.config
        w = self.model.embed_tokens.weight
        return KVCache(
            c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_len, dtype or w.dtype, device or w.device
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        token_logps: bool = False,
    ) -> ModelOutput:
        """Logits [B, T, V]; with `targets` (already shifted: targets[:, t] is the token after
        position t, IGNORE_INDEX where no loss) the mean cross-entropy instead, or with `token_logps`
        log p(target) per position [B, T] (the fused head: no logits are returned with targets).

        attention_mask [B, past+T]: 1 for real tokens, 0 for padding. segment_ids [B, T]: packed
        documents that must not see each other. position_ids [B, T]: default past..past+T-1.
        """
        h, cos, sin, mask = self.prepare(input_ids, inputs_embeds, attention_mask, position_ids, segment_ids, kv_cache)
        for i, layer in enumerate(self.model.layers):
            h = self.run_layer(i, layer, h, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(h.shape[1])
        return self.head_output(self.model.norm(h), targets, token_logps)
