"""The VLM: vision encoder + projector in front of the dense language model, unchanged.

A prompt holds one `<|image|>` token per image patch token (the chat data expands each placeholder to
`config.image_tokens` copies); `forward` embeds the text, encodes the images, and puts the projected
features in place of the image tokens' embeddings, in order (row by row, left to right), then runs
the language model on those embeddings. Image tokens sit in user turns, so they are never targets.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import ModelOutput
from .chat_format import IMAGE
from .config import VLMConfig
from .qwen2 import DenseLM
from .vision import Projector, VisionEncoder, pixel_shuffle


class VLM(nn.Module):
    config_class = VLMConfig
    zero3_leaf_modules: tuple[type[nn.Module], ...] = ()

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config.validate()
        text = config.text_config
        self.vision_tower = VisionEncoder(config)
        r = config.pixel_shuffle
        self.multi_modal_projector = Projector(config.vision_hidden_size * r * r, text.hidden_size)
        self.language_model = DenseLM(text)
        self._init_vision()

    def _init_vision(self) -> None:
        std = 0.02
        for name, p in list(self.vision_tower.named_parameters()) + list(self.multi_modal_projector.named_parameters()):
            if "layer_norm" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_blocks(self) -> list[nn.Module]:
        return []

    def after_optimizer_step(self, reduce) -> dict[str, float]:
        return {}

    def set_activation_checkpointing(self, every: int) -> None:
        self.language_model.set_activation_checkpointing(every)  # the vision tower is small beside it

    def compile_layers(self) -> None:
        self.language_model.compile_layers()

    def make_kv_cache(self, batch: int, max_len: int, dtype=None, device=None):
        return self.language_model.make_kv_cache(batch, max_len, dtype, device)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, image_tokens, hidden]."""
        return self.multi_modal_projector(pixel_shuffle(self.vision_tower(pixel_values), self.config.pixel_shuffle))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        embeds = self.language_model.model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_slots = int(is_image.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if n_slots:
                raise ValueError(f"the input has {n_slots} image tokens but no pixel_values")
            return embeds
        feats = self.image_features(pixel_values)
        if feats.shape[0] * feats.shape[1] != n_slots:
            raise ValueError(
                f"{feats.shape[0]} image(s) give {feats.shape[0] * feats.shape[1]} image tokens, "
                f"the input has {n_slots} {IMAGE} tokens"
            )
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), feats.to(embeds.dtype).reshape(-1))
        return embeds

    def forward(self, input_ids: torch.Tensor, *, pixel_values: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        """As DenseLM.forward, plus pixel_values [images, C, H, W] for the prompt's image tokens (only when
        they are in this call's input_ids: a generation step after the prefill passes none)."""
        return self.language_model(inputs_embeds=self.embed(input_ids, pixel_values), **kwargs)
