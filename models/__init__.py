"""Model configs, layers, the models, conversion to/from transformers, and generation."""

from .config import (
    PRESETS,
    ConfigError,
    DenseConfig,
    MoEConfig,
    VLMConfig,
    config_from_dict,
    load_config,
    make_config,
    save_config,
)
from .dense import IGNORE_INDEX, DenseLM
from .hf import export_hf, import_hf, load_pretrained, resolve_checkpoint
from .io import CheckpointError, build_model, load_model, save_model
from .moe import MoELM
from .output import ModelOutput
from .vlm import VLM

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DenseConfig",
    "DenseLM",
    "MoEConfig",
    "MoELM",
    "ModelOutput",
    "VLM",
    "VLMConfig",
    "build_model",
    "config_from_dict",
    "export_hf",
    "import_hf",
    "load_config",
    "load_model",
    "load_pretrained",
    "make_config",
    "resolve_checkpoint",
    "save_config",
    "save_model",
]
