"""The vision side of the VLM: a ViT encoder laid out like transformers' SigLIP vision model (same
blocks and parameter names), and the 2-layer GELU projector into the language model's embedding space.

Encoder: a patch embedding (a conv with stride = patch size), learned position embeddings, then pre-norm
blocks: x + attn(LN1(x)), x + MLP(LN2(x)) with full (non-causal) multi-head attention and a tanh-GELU
MLP. The features are the last block's output (LLaVA's `vision_feature_layer=-1`; SigLIP's final
`post_layernorm` is not used on that path, so the encoder has none). Optional pixel shuffle merges each
r x r block of patch features into one token before the projector.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VLMConfig


class VisionEmbeddings(nn.Module):
    def __init__(self, c: VLMConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            c.num_channels, c.vision_hidden_size, kernel_size=c.patch_size, stride=c.patch_size
        )
        self.position_embedding = nn.Embedding(c.grid * c.grid, c.vision_hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [N, D, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, D], patches in row-major order
        return x + self.position_embedding.weight


class VisionAttention(nn.Module):
    def __init__(self, c: VLMConfig):
        super().__init__()
        d = c.vision_hidden_size
        self.num_heads = c.vision_num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.num_heads

        def heads(y):
            return y.view(n, t, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))


class VisionMLP(nn.Module):
    def __init__(self, c: VLMConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.vision_hidden_size, c.vision_intermediate_size)
        self.fc2 = nn.Linear(c.vision_intermediate_size, c.vision_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, c: VLMConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.vision_hidden_size, eps=c.vision_layer_norm_eps)
        self.self_attn = VisionAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.vision_hidden_size, eps=c.vision_layer_norm_eps)
        self.mlp = VisionMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, c: VLMConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionBlock(c) for _ in range(c.vision_num_layers))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels)
        for block in self.encoder.layers:
            x = block(x)
        return x


def pixel_shuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """[N, g*g, D] -> [N, (g/r)^2, r*r*D]: each r x r block of neighbouring patches becomes one token."""
    if r == 1:
        return x
    n, t, d = x.shape
    g = int(round(t**0.5))
    x = x.view(n, g // r, r, g // r, r, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (g // r) ** 2, r * r * d)


class Projector(nn.Module):
    """LLaVA's multi-modal projector: linear -> GELU -> linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))
