"""Qwen2.5-style dense decoder. Parameter names are transformers' Qwen2 checkpoint keys, so export
and import are a direct copy of the state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DenseConfig
from .layers import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLUMLP, build_attention_mask
from .output import ModelOutput

IGNORE_INDEX = -100


class DecoderLayer(nn.Module):
    def __init__(self, config: DenseConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernel_backend)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernel_backend)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.kernel_backend)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DenseBackbone(nn.Module):
    """Embeddings, decoder layers and the final norm (transformers' `Qwen2Model`)."""

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.kernel_backend)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)


class DenseLM(nn.Module):
    """Causal language model; `forward` takes token ids (or embeddings, for the VLM) and returns logits."""

    config_class = DenseConfig

    def __init__(self, config: DenseConfig):
        super().__init__()
        self.config = config.validate()
        self.model = DenseBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights, zero biases, unit norms; residual outputs scaled by
        1/sqrt(2 * layers) (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                scale = 1 / math.sqrt(2 * self.config.num_hidden_layers)
                residual_out = name.endswith(("o_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, mean=0.0, std=std * (scale if residual_out else 1.0))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def make_kv_cache(self, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        c = self.config
        w = self.model.embed_tokens.weight
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, c.head_dim, max_len,
                       dtype or w.dtype, device or w.device)

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
    ) -> ModelOutput:
        """Logits [B, T, V]; with `targets` (already shifted: targets[:, t] is the token after
        position t, IGNORE_INDEX where no loss) also the mean cross-entropy.

        attention_mask [B, past+T]: 1 for real tokens, 0 for padding. segment_ids [B, T]: packed
        documents that must not see each other. position_ids [B, T]: default past..past+T-1.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.model.embed_tokens(input_ids)
        b, t, _ = inputs_embeds.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + t} tokens is longer than the model's context "
                f"(max_position_embeddings={self.config.max_position_embeddings})"
            )
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=device).expand(b, t)
        cos, sin = self.model.rotary_emb(position_ids, inputs_embeds.dtype)
        mask = build_attention_mask(t, past + t, device, attention_mask, segment_ids)
        h = inputs_embeds
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(t)
        logits = self.lm_head(self.model.norm(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return ModelOutput(logits=logits, loss=loss)
