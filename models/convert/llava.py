"""Our VLM <-> transformers' native `LlavaForConditionalGeneration` (a SigLIP vision tower, LLaVA's
2-layer GELU projector, a Qwen2 language model).

Names: our `vision_tower.*` and `multi_modal_projector.*` are LLaVA's `model.vision_tower.*` and
`model.multi_modal_projector.*`; `language_model.model.*` is `model.language_model.*` and
`language_model.lm_head` is `lm_head`. LLaVA reads the vision features from the last encoder layer
(`vision_feature_layer=-1`, strategy "full": SigLIP has no CLS token), which skips SigLIP's
`post_layernorm`; it is exported as the identity. SigLIP's pooling head is off (`vision_use_head=False`).
What cannot map: pixel shuffle (LLaVA has none); such a model does not export, and its pixel-shuffle
step is tested against a straightforward reimplementation instead (tests/test_vlm.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..chat_format import IMAGE
from ..checkpoint import CheckpointError, load_state_strict
from ..config import VLMConfig
from ..registry import build_model
from . import qwen2

MODEL_TYPE = "vlm"
HF_MODEL_TYPE = "llava"

_PREFIXES = (
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def hf_config(config: VLMConfig, special: dict[str, int]):
    from transformers import LlavaConfig, SiglipVisionConfig

    if config.pixel_shuffle != 1:
        raise CheckpointError(
            "a VLM with pixel_shuffle > 1 has no LlavaForConditionalGeneration equivalent "
            "(LLaVA's projector takes one token per patch)"
        )
    vision = SiglipVisionConfig(
        hidden_size=config.vision_hidden_size,
        intermediate_size=config.vision_intermediate_size,
        num_hidden_layers=config.vision_num_layers,
        num_attention_heads=config.vision_num_heads,
        num_channels=config.num_channels,
        image_size=config.image_size,
        patch_size=config.patch_size,
        layer_norm_eps=config.vision_layer_norm_eps,
        hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
    )
    text = qwen2.hf_config(config.text_config, special)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=config.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_seq_length=config.image_tokens,
        multimodal_projector_bias=True,
        tie_word_embeddings=config.tie_word_embeddings,
        architectures=["LlavaForConditionalGeneration"],
    )


def to_llava_state(state: dict[str, torch.Tensor], config: VLMConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for ours, theirs in _PREFIXES:
            if key.startswith(ours):
                out[theirs + key[len(ours) :]] = value
                break
        else:
            raise KeyError(f"no LLaVA name for {key}")
    d = config.vision_hidden_size
    out["model.vision_tower.post_layernorm.weight"] = torch.ones(d)
    out["model.vision_tower.post_layernorm.bias"] = torch.zeros(d)
    return out


def from_llava_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("model.vision_tower.post_layernorm."):
            continue  # not on LLaVA's feature path (vision_feature_layer=-1)
        if key.startswith("model.vision_tower.vision_model."):  # the older nesting
            key = "model.vision_tower." + key[len("model.vision_tower.vision_model.") :]
        for ours, theirs in _PREFIXES:
            if key.startswith(theirs):
                out[ours + key[len(theirs) :]] = value
                break
        else:
            out[key] = value  # left for the strict load to report
    return out


def export(model, special: dict[str, int], out: Path) -> None:
    """Through transformers' own save (its on-disk names), after a strict load of our weights."""
    from transformers import LlavaForConditionalGeneration

    hf = LlavaForConditionalGeneration(hf_config(model.config, special))
    hf.load_state_dict(to_llava_state(model.state_dict(), model.config), strict=True)
    hf.save_pretrained(out)
    write_processor(model.config, out)


def write_processor(config: VLMConfig, out: Path) -> None:
    """The image processor and processor configs, so `AutoProcessor.from_pretrained(out)` gives the pixel values
    this project's image loader gives (train/data/images.py: RGB, bicubic resize to the square input, /255,
    (x - mean) / std) and expands each <|image|> into the model's image tokens."""
    from transformers import SiglipImageProcessor

    size = config.image_size
    SiglipImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=3,  # PIL bicubic
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[config.image_mean] * 3,
        image_std=[config.image_std] * 3,
        do_convert_rgb=True,
    ).save_pretrained(out)
    processor = {
        "processor_class": "LlavaProcessor",
        "patch_size": config.patch_size,
        "vision_feature_select_strategy": "full",
        "image_token": IMAGE,
        "num_additional_image_tokens": 0,
    }
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def config_from_hf(hf, where: str) -> VLMConfig:
    if hf.text_config.model_type != qwen2.HF_MODEL_TYPE:
        raise CheckpointError(f"{where}: LLaVA's language model must be qwen2, got {hf.text_config.model_type!r}")
    text = qwen2.config_from_hf(hf.text_config, where)
    text.tie_word_embeddings = bool(getattr(hf, "tie_word_embeddings", text.tie_word_embeddings))
    v = hf.vision_config
    if getattr(hf, "vision_feature_select_strategy", "full") != "full" or hf.vision_feature_layer != -1:
        raise CheckpointError(
            f"{where}: only LLaVA with vision_feature_layer=-1 and the 'full' feature strategy is supported"
        )
    if v.hidden_act != "gelu_pytorch_tanh" or hf.projector_hidden_act != "gelu":
        raise CheckpointError(f"{where}: only SigLIP's tanh-GELU vision MLP and a GELU projector are supported")
    return VLMConfig(
        text_config=text,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        vision_hidden_size=v.hidden_size,
        vision_intermediate_size=v.intermediate_size,
        vision_num_layers=v.num_hidden_layers,
        vision_num_heads=v.num_attention_heads,
        vision_layer_norm_eps=v.layer_norm_eps,
        image_token_id=hf.image_token_id,
    ).validate()


def load(d: Path, hf):
    from transformers import LlavaForConditionalGeneration

    model = build_model(config_from_hf(hf, str(d / "config.json")))
    state = LlavaForConditionalGeneration.from_pretrained(str(d)).state_dict()  # transformers' in-memory names
    load_state_strict(model, from_llava_state(state), str(d))
    return model
