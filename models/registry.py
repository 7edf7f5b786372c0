"""The model types: which class each config builds (`build_model`)."""

from __future__ import annotations

import torch

from .config import CONFIG_CLASSES
from .deepseek_v3 import MoELM
from .qwen2 import DenseLM
from .vlm import VLM

MODEL_CLASSES: dict[str, type[torch.nn.Module]] = {"dense": DenseLM, "moe": MoELM, "vlm": VLM}
assert set(MODEL_CLASSES) == set(CONFIG_CLASSES)


def build_model(config) -> torch.nn.Module:
    return MODEL_CLASSES[config.model_type](config)
