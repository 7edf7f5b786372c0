"""Model configs: dataclasses that round-trip to JSON.

A config file names its model with ``"model_type"``; `load_config` reads it back into the right
class and rejects unknown or ill-typed fields with the field's name. Presets give named sizes.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path

from kernels import check_backend


class ConfigError(ValueError):
    """A model config that cannot be used; the message names the file and field."""


@dataclass
class DenseConfig:
    """Qwen2.5-style decoder: RMSNorm, SwiGLU, RoPE (rotate-half), GQA with q/k/v bias."""

    model_type: typing.ClassVar[str] = "dense"

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    kernel_backend: str = "auto"  # auto | triton | torch (LLM_SCRATCH_KERNELS overrides)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> DenseConfig:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", "float") and not isinstance(v, bool) and v is not None and v <= 0:
                raise ConfigError(f"field '{f.name}' must be positive, got {v}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"field 'hidden_size' ({self.hidden_size}) must be divisible by "
                f"'num_attention_heads' ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"field 'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head dim hidden_size/num_attention_heads must be even, got {self.head_dim}")
        try:
            check_backend(self.kernel_backend)
        except ValueError as e:
            raise ConfigError(f"field 'kernel_backend': {e}") from None
        return self

    def num_parameters(self) -> int:
        d, h = self.hidden_size, self.head_dim
        kv = self.num_key_value_heads * h
        attn = d * d + d + 2 * (d * kv + kv) + d * d
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return emb + self.num_hidden_layers * per_layer + d

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}


CONFIG_CLASSES: dict[str, type] = {"dense": DenseConfig}

PRESETS: dict[str, dict[str, dict]] = {
    "dense": {
        # ~0.9M parameters with an ~800-token vocabulary: the CPU demo's model (fast enough to learn
        # column arithmetic through SFT in a few minutes on 2 cores).
        "nano": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512),
        # ~0.2M parameters: unit tests and smoke runs.
        "micro": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256),
        # ~3-4M parameters with a 4k vocabulary.
        "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024),
        # ~30M parameters: a real small model for a GPU.
        "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=2048),
        # ~125M parameters.
        "base": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                     num_key_value_heads=4, max_position_embeddings=2048),
    }
}


def _check_type(name: str, value, annotation: str, where: str):
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(annotation)
    if expected is None:
        return value
    ok = isinstance(value, expected) and not (annotation in ("int", "float") and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}field '{name}' must be {annotation}, got {value!r}")
    return float(value) if annotation == "float" else value


def config_from_dict(d: dict, where: str = ""):
    """Build the config class named by d['model_type'], checking every field."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}a model config must be a JSON object")
    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(f"{where}field 'model_type' must be one of {sorted(CONFIG_CLASSES)}, got {model_type!r}")
    cls = CONFIG_CLASSES[model_type]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}unknown field(s) for a {model_type} config: {', '.join(unknown)}")
    kwargs = {k: _check_type(k, v, fields[k].type, where) for k, v in d.items()}
    try:
        return cls(**kwargs).validate()
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def make_config(model_type: str, preset: str | None = None, **overrides):
    """A config from a named preset plus overrides, e.g. make_config('dense', 'tiny', vocab_size=2048)."""
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(f"unknown model type {model_type!r}; choose one of {sorted(CONFIG_CLASSES)}")
    base = {}
    if preset is not None:
        presets = PRESETS.get(model_type, {})
        if preset not in presets:
            raise ConfigError(f"unknown preset {preset!r} for {model_type}; choose one of {sorted(presets)}")
        base = dict(presets[preset])
    base.update(overrides)
    return config_from_dict({"model_type": model_type, **base})


def save_config(config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def load_config(path: str | Path):
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: model config file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return config_from_dict(d, where=f"{path}: ")
