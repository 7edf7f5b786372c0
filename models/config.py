"""Model configs: dataclasses that round-trip to JSON, checked by one set of rules.

A config file names its model with ``"model_type"``; `load_config` reads it back into the right class.
Every field is checked from its type annotation and its metadata (one `ModelConfig.validate` for all
three configs): the type must match (an int where an int is declared, a bool where a bool is), numbers
must be finite and positive unless the field says it may be zero (`nonneg()`), and each class adds the
rules that tie fields together in `check()`. A wrong field is an error naming it. Presets give named sizes.

Configs describe the architecture only. How the ops run (Triton kernels or PyTorch references) is a
setting of the process (`kernels.use_backend`), not of the model: older files that still carry a
`kernel_backend` field load, and the field is ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

LEGACY_FIELDS = ("kernel_backend",)  # written by older versions; accepted on load and ignored


class ConfigError(ValueError):
    """A model config that cannot be used; the message names the file and field."""


def nonneg(default):
    """A numeric field that may be zero (the others must be positive)."""
    return field(default=default, metadata={"min": 0})


@dataclass
class ModelConfig:
    """What the three configs share: validation from the annotations, JSON round trip."""

    model_type: typing.ClassVar[str] = ""

    def validate(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name), hints[f.name])
        self.check()
        return self

    def check(self) -> None:
        """Rules between fields (overridden per class); raise ConfigError naming the field."""

    def to_dict(self) -> dict:
        out: dict = {"model_type": self.model_type}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, ModelConfig) else v
        return out


def _check_field(f: dataclasses.Field, value, annotation) -> None:
    allowed = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in allowed:
            return
        raise ConfigError(f"field '{f.name}' must not be null")
    kinds = [a for a in allowed if a is not type(None)]
    ok = any(
        isinstance(value, bool)
        if a is bool
        else (isinstance(value, (int, float)) and not isinstance(value, bool))
        if a is float
        else (isinstance(value, int) and not isinstance(value, bool))
        if a is int
        else isinstance(value, a)
        for a in kinds
    )
    if not ok:
        names = " or ".join(getattr(a, "__name__", str(a)) for a in kinds)
        raise ConfigError(f"field '{f.name}' must be {names}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"field '{f.name}' must be a finite number, got {value!r}")
        low = f.metadata.get("min", None)
        if low == 0 and value < 0:
            raise ConfigError(f"field '{f.name}' must be non-negative, got {value}")
        if low is None and value <= 0:
            raise ConfigError(f"field '{f.name}' must be positive, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"field '{f.name}.{k}' must be a finite number, got {v!r}")


@dataclass
class DenseConfig(ModelConfig):
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

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check(self) -> None:
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

    def num_parameters(self) -> int:
        d, h = self.hidden_size, self.head_dim
        kv = self.num_key_value_heads * h
        attn = d * d + d + 2 * (d * kv + kv) + d * d
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return emb + self.num_hidden_layers * per_layer + d


@dataclass
class MoEConfig(ModelConfig):
    """DeepSeek-V3-style decoder: Multi-head Latent Attention and DeepSeekMoE (shared + fine-grained routed
    experts, sigmoid routing with a selection-only bias, group-limited top-k). Field names are
    transformers' `DeepseekV3Config`'s."""

    model_type: typing.ClassVar[str] = "moe"

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688  # the dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 128  # each routed (and shared) expert's hidden size
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    # MLA
    q_lora_rank: int | None = None  # None: a plain q_proj; else q_a_proj -> q_a_layernorm -> q_b_proj
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # DeepSeekMoE
    n_shared_experts: int = nonneg(1)
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = nonneg(1)
    # load balancing (DeepSeek-V3 sec. 2.1.2): bias update speed gamma, sequence-wise balance loss alpha
    bias_update_speed: float = nonneg(1e-3)
    aux_loss_alpha: float = nonneg(1e-4)
    # multi-token prediction (DeepSeek-V3 sec. 2.2): 0 or 1 extra depth, its loss weight lambda
    num_mtp_layers: int = nonneg(0)
    mtp_loss_weight: float = nonneg(0.3)
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def check(self) -> None:
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"field 'qk_rope_head_dim' must be even, got {self.qk_rope_head_dim}")
        if self.num_mtp_layers > 1:
            raise ConfigError(f"field 'num_mtp_layers' must be 0 or 1, got {self.num_mtp_layers}")
        e, g = self.n_routed_experts, self.n_group
        if e % g:
            raise ConfigError(f"field 'n_routed_experts' ({e}) must be divisible by 'n_group' ({g})")
        if g > 1 and e // g < 2:
            raise ConfigError(
                f"group-limited routing needs at least 2 experts per group; n_routed_experts/n_group = {e // g}"
            )
        if self.topk_group > g:
            raise ConfigError(f"field 'topk_group' ({self.topk_group}) must not exceed 'n_group' ({g})")
        if self.num_experts_per_tok > self.topk_group * (e // g):
            raise ConfigError(
                f"field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the experts in "
                f"the {self.topk_group} chosen group(s) ({self.topk_group * (e // g)})"
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(
                f"field 'first_k_dense_replace' ({self.first_k_dense_replace}) exceeds "
                f"'num_hidden_layers' ({self.num_hidden_layers})"
            )
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type", rs.get("type"))
            if kind != "yarn" or "factor" not in rs or "original_max_position_embeddings" not in rs:
                raise ConfigError(
                    "field 'rope_scaling' must be a YaRN dict with 'type': 'yarn', 'factor' and "
                    f"'original_max_position_embeddings', got {rs!r}"
                )


@dataclass
class VLMConfig(ModelConfig):
    """A ViT encoder (SigLIP's block layout and names) and a 2-layer GELU projector in front of the dense
    model, whose own config is `text_config`. The image is cut into (image_size / patch_size)^2 patches;
    with `pixel_shuffle` r > 1 each r x r block of patch features becomes one token (r^2 fewer image
    tokens, r^2 times wider into the projector)."""

    model_type: typing.ClassVar[str] = "vlm"

    text_config: DenseConfig = field(default_factory=DenseConfig)
    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_num_layers: int = 2
    vision_num_heads: int = 4
    vision_layer_norm_eps: float = 1e-6
    pixel_shuffle: int = 1
    image_token_id: int = nonneg(5)  # <|image|> in our tokenizer
    image_mean: float = 0.5  # per channel, as SigLIP's processor: (pixel / 255 - mean) / std
    image_std: float = 0.5

    def __post_init__(self):
        if isinstance(self.text_config, dict):  # as JSON holds it
            self.text_config = config_from_dict({"model_type": "dense", **self.text_config}, where="text_config: ")

    # the language model's sizes, as the trainer and generation ask any model for them
    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def max_position_embeddings(self) -> int:
        return self.text_config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text_config.tie_word_embeddings

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        return (self.grid // self.pixel_shuffle) ** 2

    def check(self) -> None:
        try:
            self.text_config.validate()
        except ConfigError as e:
            raise ConfigError(f"text_config: {e}") from None
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"field 'image_size' ({self.image_size}) must be a multiple of 'patch_size' ({self.patch_size})"
            )
        if self.grid % self.pixel_shuffle:
            raise ConfigError(f"field 'pixel_shuffle' ({self.pixel_shuffle}) must divide the patch grid ({self.grid})")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ConfigError(
                f"field 'vision_hidden_size' ({self.vision_hidden_size}) must be divisible by "
                f"'vision_num_heads' ({self.vision_num_heads})"
            )


CONFIG_CLASSES: dict[str, type[ModelConfig]] = {"dense": DenseConfig, "moe": MoEConfig, "vlm": VLMConfig}

# Sizes in the comments are computed from the config (tests/test_config.py recomputes them): parameters
# with the default 4096-token vocabulary; the VLM's are the vision tower and projector in front of the
# dense `nano` model.
PRESETS: dict[str, dict[str, dict]] = {
    "dense": {
        # dense nano: 1.38M parameters (0.97M with the demo's 896-token vocabulary). The CPU demo's model:
        # fast enough to learn column arithmetic through SFT in minutes on 2 cores. Eight heads, each with
        # its own key/value head: with 4 query heads sharing 2 key/value heads, SFT on the same data reached
        # 32.5% or 93.2% held-out exact match depending on the batch order alone (docs/results.md).
        "nano": dict(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=512,
        ),
        # dense micro: 0.35M parameters. Unit tests and smoke runs.
        "micro": dict(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        ),
        # dense tiny: 3.95M parameters.
        "tiny": dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        ),
        # dense small: 24.66M parameters. A real small model for a GPU.
        "small": dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=2048,
        ),
        # dense base: 78.68M parameters (100.70M with a 32768-token vocabulary).
        "base": dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
    },
    "moe": {
        # moe micro: 0.65M parameters. Unit tests and verify.
        "micro": dict(
            hidden_size=64,
            intermediate_size=176,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=256,
        ),
        # moe nano: 2.13M parameters. The demo's MoE model beside the dense nano model.
        "nano": dict(
            hidden_size=128,
            intermediate_size=384,
            moe_intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            max_position_embeddings=512,
        ),
        # moe tiny: 8.10M parameters.
        "tiny": dict(
            hidden_size=256,
            intermediate_size=688,
            moe_intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            q_lora_rank=96,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            max_position_embeddings=1024,
        ),
        # moe small: 103.74M parameters. A GPU-sized small MoE.
        "small": dict(
            hidden_size=512,
            intermediate_size=1408,
            moe_intermediate_size=256,
            num_hidden_layers=8,
            num_attention_heads=8,
            q_lora_rank=256,
            kv_lora_rank=128,
            qk_nope_head_dim=64,
            qk_rope_head_dim=32,
            v_head_dim=64,
            n_routed_experts=32,
            num_experts_per_tok=6,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
            max_position_embeddings=2048,
        ),
    },
    # vision side only; the text side comes from the dense model the VLM starts from
    "vlm": {
        # vlm micro: 0.04M parameters.
        "micro": dict(
            image_size=32,
            patch_size=8,
            vision_hidden_size=32,
            vision_intermediate_size=64,
            vision_num_layers=1,
            vision_num_heads=2,
        ),
        # vlm nano: 0.11M parameters.
        "nano": dict(
            image_size=32,
            patch_size=8,
            vision_hidden_size=64,
            vision_intermediate_size=128,
            vision_num_layers=2,
            vision_num_heads=4,
        ),
        # vlm small: 21.88M parameters.
        "small": dict(
            image_size=224,
            patch_size=16,
            vision_hidden_size=384,
            vision_intermediate_size=1536,
            vision_num_layers=12,
            vision_num_heads=6,
            pixel_shuffle=2,
        ),
    },
}


def config_from_dict(d: dict, where: str = ""):
    """Build the config class named by d['model_type'], checking every field."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}a model config must be a JSON object")
    d = {k: v for k, v in d.items() if k not in LEGACY_FIELDS}
    model_type = d.pop("model_type", None)
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(f"{where}field 'model_type' must be one of {sorted(CONFIG_CLASSES)}, got {model_type!r}")
    cls = CONFIG_CLASSES[model_type]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}unknown field(s) for a {model_type} config: {', '.join(unknown)}")
    try:
        return _floats(cls(**d)).validate()
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def _floats(config: ModelConfig) -> ModelConfig:
    """Store an int given for a float field as a float (JSON writes 10000.0 as 10000 in other tools)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if hints[f.name] is float and isinstance(v, int) and not isinstance(v, bool):
            setattr(config, f.name, float(v))
    return config


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


def save_config(config: ModelConfig, path: str | Path) -> None:
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
