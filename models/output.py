"""What a model's forward returns (attribute access like transformers' outputs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux: dict | None = None  # extra per-model losses/statistics (MoE balance, MTP), for the trainer to log
