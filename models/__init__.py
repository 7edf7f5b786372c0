"""Model configs, layers, the three models, checkpoints, conversion to/from transformers, and generation.

Reading order: models/qwen2.py (the dense model, top to bottom) with models/layers.py; then
models/deepseek_v3.py with models/mla.py and models/moe.py; then models/vlm.py with models/vision.py.
The math of every op they call is on one page, docs/ops.md.
"""

from .base import IGNORE_INDEX, ModelOutput, TrainableModel
from .checkpoint import CheckpointError, load_model, resolve_checkpoint, save_model
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
from .convert import export_hf, import_hf, load_pretrained
from .deepseek_v3 import MoELM
from .qwen2 import DenseLM
from .registry import build_model
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
    "TrainableModel",
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
