"""Our dense model <-> transformers' `Qwen2ForCausalLM`. The state dict keys are the same, so the
conversion is a config translation plus a copy of the tensors (a tied lm_head is stored once)."""

from __future__ import annotations

from pathlib import Path

from ..chat_format import ENDOFTEXT, PAD
from ..checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    add_config_keys,
    load_state_strict,
    read_hf_weights,
    save_weights,
)
from ..config import DenseConfig
from ..registry import build_model

MODEL_TYPE = "dense"
HF_MODEL_TYPE = "qwen2"

# DenseConfig fields that Qwen2Config has under the same name and meaning (rope_theta moved into
# rope_parameters in transformers 5, so it is translated on its own).
SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "initializer_range",
)


def hf_config(config: DenseConfig, special: dict[str, int]):
    from transformers import Qwen2Config

    return Qwen2Config(
        **{f: getattr(config, f) for f in SHARED_FIELDS},
        rope_theta=config.rope_theta,
        hidden_act="silu",
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=special.get(ENDOFTEXT),
        pad_token_id=special.get(PAD),
        architectures=["Qwen2ForCausalLM"],
    )


def export(model, special: dict[str, int], out: Path) -> None:
    hf_config(model.config, special).save_pretrained(out)
    add_config_keys(
        out, {"rope_theta": model.config.rope_theta}
    )  # transformers 4.x reads it here, not in rope_parameters
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_weights({k: v.contiguous() for k, v in state.items()}, out / WEIGHTS_FILE)


def _rope_theta(hf) -> float:
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    scaling = getattr(hf, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise CheckpointError(f"rope scaling {rope_type!r} is not supported by the dense model")
    theta = params.get("rope_theta", getattr(hf, "rope_theta", None))
    if theta is None:
        raise CheckpointError("config.json has no rope_theta")
    return float(theta)


def config_from_hf(hf, where: str) -> DenseConfig:
    if getattr(hf, "use_sliding_window", False):
        raise CheckpointError(f"{where}: sliding-window attention is not supported")
    if hf.hidden_act != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf.hidden_act!r} is not supported (expected 'silu')")
    fields = {f: getattr(hf, f) for f in SHARED_FIELDS}
    fields["tie_word_embeddings"] = bool(fields["tie_word_embeddings"])
    config = DenseConfig(**fields, rope_theta=_rope_theta(hf)).validate()
    if getattr(hf, "head_dim", None) not in (None, config.head_dim):
        raise CheckpointError(f"{where}: head_dim {hf.head_dim} != hidden_size/num_attention_heads")
    return config


def load(d: Path, hf):
    model = build_model(config_from_hf(hf, str(d / "config.json")))
    load_state_strict(model, read_hf_weights(d), str(d))
    return model
