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


@dataclass
class MoEConfig:
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
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    # load balancing (DeepSeek-V3 sec. 2.1.2): bias update speed gamma, sequence-wise balance loss alpha
    bias_update_speed: float = 1e-3
    aux_loss_alpha: float = 1e-4
    # multi-token prediction (DeepSeek-V3 sec. 2.2): 0 or 1 extra depth, its loss weight lambda
    num_mtp_layers: int = 0
    mtp_loss_weight: float = 0.3
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    kernel_backend: str = "auto"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> MoEConfig:
        may_be_zero = {"bias_update_speed", "aux_loss_alpha", "num_mtp_layers", "first_k_dense_replace",
                       "n_shared_experts", "mtp_loss_weight"}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if v < 0 or (v == 0 and f.name not in may_be_zero):
                need = "non-negative" if f.name in may_be_zero else "positive"
                raise ConfigError(f"field '{f.name}' must be {need}, got {v}")
        try:
            check_backend(self.kernel_backend)
        except ValueError as e:
            raise ConfigError(f"field 'kernel_backend': {e}") from None
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"field 'qk_rope_head_dim' must be even, got {self.qk_rope_head_dim}")
        if self.num_mtp_layers > 1:
            raise ConfigError(f"field 'num_mtp_layers' must be 0 or 1, got {self.num_mtp_layers}")
        e, g = self.n_routed_experts, self.n_group
        if e % g:
            raise ConfigError(f"field 'n_routed_experts' ({e}) must be divisible by 'n_group' ({g})")
        if g > 1 and e // g < 2:
            raise ConfigError(f"group-limited routing needs at least 2 experts per group; "
                              f"n_routed_experts/n_group = {e // g}")
        if self.topk_group > g:
            raise ConfigError(f"field 'topk_group' ({self.topk_group}) must not exceed 'n_group' ({g})")
        if self.num_experts_per_tok > self.topk_group * (e // g):
            raise ConfigError(f"field 'num_experts_per_tok' ({self.num_experts_per_tok}) exceeds the experts in "
                              f"the {self.topk_group} chosen group(s) ({self.topk_group * (e // g)})")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(f"field 'first_k_dense_replace' ({self.first_k_dense_replace}) exceeds "
                              f"'num_hidden_layers' ({self.num_hidden_layers})")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            kind = rs.get("rope_type", rs.get("type"))
            if kind != "yarn" or "factor" not in rs or "original_max_position_embeddings" not in rs:
                raise ConfigError("field 'rope_scaling' must be a YaRN dict with 'type': 'yarn', 'factor' and "
                                  f"'original_max_position_embeddings', got {rs!r}")
        return self

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}


@dataclass
class VLMConfig:
    """A ViT encoder (SigLIP's block layout and names) and a 2-layer GELU projector in front of the dense
    model, whose own config is `text_config` (a DenseConfig as a dict). The image is cut into
    (image_size / patch_size)^2 patches; with `pixel_shuffle` r > 1 each r x r block of patch features
    becomes one token (r^2 fewer image tokens, r^2 times wider into the projector)."""

    model_type: typing.ClassVar[str] = "vlm"

    text_config: dict = dataclasses.field(default_factory=dict)
    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_num_layers: int = 2
    vision_num_heads: int = 4
    vision_layer_norm_eps: float = 1e-6
    pixel_shuffle: int = 1
    image_token_id: int = 5  # <|image|> in our tokenizer
    image_mean: float = 0.5  # per channel, as SigLIP's processor: (pixel / 255 - mean) / std
    image_std: float = 0.5
    kernel_backend: str = "auto"

    @property
    def text(self) -> DenseConfig:
        return config_from_dict({"model_type": "dense", **{k: v for k, v in self.text_config.items()
                                                           if k != "model_type"}}, where="text_config: ")

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def max_position_embeddings(self) -> int:
        return self.text.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        return (self.grid // self.pixel_shuffle) ** 2

    def validate(self) -> VLMConfig:
        self.text  # noqa: B018 - validates the text config, naming its fields
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
                raise ConfigError(f"field '{f.name}' must be positive, got {v}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"field 'image_size' ({self.image_size}) must be a multiple of 'patch_size' "
                              f"({self.patch_size})")
        if self.grid % self.pixel_shuffle:
            raise ConfigError(f"field 'pixel_shuffle' ({self.pixel_shuffle}) must divide the patch grid ({self.grid})")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ConfigError(f"field 'vision_hidden_size' ({self.vision_hidden_size}) must be divisible by "
                              f"'vision_num_heads' ({self.vision_num_heads})")
        try:
            check_backend(self.kernel_backend)
        except ValueError as e:
            raise ConfigError(f"field 'kernel_backend': {e}") from None
        return self

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}


CONFIG_CLASSES: dict[str, type] = {"dense": DenseConfig, "moe": MoEConfig, "vlm": VLMConfig}

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
    },
    "moe": {
        # ~0.4M parameters: unit tests, verify, the demo's MoE run.
        "micro": dict(hidden_size=64, intermediate_size=176, moe_intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=256),
        # ~1.5M parameters: the demo's MoE model beside the dense nano model.
        "nano": dict(hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                     v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                     max_position_embeddings=512),
        # ~10M parameters with a 4k vocabulary.
        "tiny": dict(hidden_size=256, intermediate_size=688, moe_intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                     qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                     topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=1024),
        # a GPU-sized small MoE.
        "small": dict(hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=8,
                      num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
                      qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=6, n_group=4,
                      topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=2048),
    },
    # vision side only; the text side comes from the dense model the VLM starts from
    "vlm": {
        "micro": dict(image_size=32, patch_size=8, vision_hidden_size=32, vision_intermediate_size=64,
                      vision_num_layers=1, vision_num_heads=2),
        "nano": dict(image_size=32, patch_size=8, vision_hidden_size=64, vision_intermediate_size=128,
                     vision_num_layers=2, vision_num_heads=4),
        "small": dict(image_size=224, patch_size=16, vision_hidden_size=384, vision_intermediate_size=1536,
                      vision_num_layers=12, vision_num_heads=6, pixel_shuffle=2),
    },
}


def _check_type(name: str, value, annotation: str, where: str):
    if annotation.endswith(" | None"):
        if value is None:
            return None
        annotation = annotation[: -len(" | None")]
    expected = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict}.get(annotation)
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
