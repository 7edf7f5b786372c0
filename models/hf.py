"""Conversion to and from native transformers checkpoints, and `load_pretrained` for both formats.

The dense model exports as `Qwen2ForCausalLM` and the MoE model as `DeepseekV3ForCausalLM` (both native,
no trust_remote_code). The dense state dict keys are the same, so its conversion is a config translation
plus a copy of the tensors; the MoE model's few differences are in models/hf_deepseek.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import DenseConfig, MoEConfig, VLMConfig
from .hf_deepseek import config_from_deepseek_v3, deepseek_v3_config, from_deepseek_state, to_deepseek_state
from .hf_llava import from_llava_state, llava_config, to_llava_state, vlm_config_from_llava
from .io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_write,
    build_model,
    copy_tokenizer_files,
    load_model,
    load_state_strict,
    read_weights,
    save_weights,
)

LATEST_FILE = "latest"  # in a training run's directory: the name of the newest complete checkpoint


def _special_ids(tokenizer_dir: Path) -> dict[str, int]:
    path = tokenizer_dir / "tokenizer.json"
    if not path.exists():
        return {}
    added = json.loads(path.read_text()).get("added_tokens", [])
    return {t["content"]: t["id"] for t in added}


# DenseConfig fields that Qwen2Config has under the same name and meaning (rope_theta moved into
# rope_parameters in transformers 5, so it is translated on its own).
QWEN2_SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                       "initializer_range")


def _qwen2_config(config: DenseConfig, special: dict[str, int]):
    from transformers import Qwen2Config

    eos = special.get("<|endoftext|>")
    return Qwen2Config(
        **{f: getattr(config, f) for f in QWEN2_SHARED_FIELDS},
        rope_theta=config.rope_theta,
        hidden_act="silu",
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=special.get("<|pad|>"),
        architectures=["Qwen2ForCausalLM"],
    )


def export_hf(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers checkpoint (config.json, model.safetensors, generation_config.json and
    the tokenizer files) from one of our checkpoints or run directories."""
    src = resolve_checkpoint(checkpoint)
    model = load_model(src)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = _special_ids(src)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once (a VLM's LLaVA export handles its own)
    if isinstance(model.config, DenseConfig):
        _qwen2_config(model.config, special).save_pretrained(out)
    elif isinstance(model.config, MoEConfig):
        deepseek_v3_config(model.config, special).save_pretrained(out)
        state = to_deepseek_state(state, model.config)
    elif isinstance(model.config, VLMConfig):
        _save_llava(model, special, out)
        state = None
    else:
        raise CheckpointError(f"{src}: export of model type {model.config.model_type!r} is not supported")
    if state is not None:
        save_weights({k: v.contiguous() for k, v in state.items()}, out / WEIGHTS_FILE)
    if (src / "tokenizer.json").exists():
        copy_tokenizer_files(src, out)
    eos = [special[t] for t in ("<|im_end|>", "<|endoftext|>") if t in special]
    gen = {"eos_token_id": eos, "pad_token_id": special.get("<|pad|>"), "do_sample": False}
    atomic_write(out / "generation_config.json", lambda tmp: tmp.write_text(json.dumps(gen, indent=2) + "\n"))
    return out


def _save_llava(model, special: dict[str, int], out: Path) -> None:
    """LLaVA through transformers' own save (its on-disk names), after a strict load of our weights."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava_config(model.config, _qwen2_config(model.config.text, special))
    hf = LlavaForConditionalGeneration(cfg)
    hf.load_state_dict(to_llava_state(model.state_dict(), model.config), strict=True)
    hf.save_pretrained(out)


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    scaling = getattr(hf_config, "rope_scaling", None)
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise CheckpointError(f"rope scaling {rope_type!r} is not supported by the dense model")
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise CheckpointError("config.json has no rope_theta")
    return float(theta)


def _read_hf_weights(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(read_weights(d / f))
        return state
    return read_weights(d / WEIGHTS_FILE)


def import_hf(hf_dir: str | Path) -> torch.nn.Module:
    """Build our model from a transformers `Qwen2ForCausalLM` or `DeepseekV3ForCausalLM` directory (strict)."""
    from transformers import AutoConfig

    d = Path(hf_dir)
    try:
        hf = AutoConfig.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d / 'config.json'}: cannot read the transformers config ({e})") from None
    if hf.model_type == "deepseek_v3":
        config = config_from_deepseek_v3(hf, str(d / "config.json"))
        model = build_model(config)
        load_state_strict(model, from_deepseek_state(_read_hf_weights(d), config), str(d))
        return model
    if hf.model_type == "llava":
        return _import_llava(d, hf)
    if hf.model_type != "qwen2":
        raise CheckpointError(f"{d / 'config.json'}: model_type {hf.model_type!r} is not supported "
                              "(expected 'qwen2', 'deepseek_v3' or 'llava')")
    config = _dense_config_from_qwen2(hf, str(d / "config.json"))
    model = build_model(config)
    load_state_strict(model, _read_hf_weights(d), str(d))
    return model


def _dense_config_from_qwen2(hf, where: str) -> DenseConfig:
    if getattr(hf, "use_sliding_window", False):
        raise CheckpointError(f"{where}: sliding-window attention is not supported")
    if hf.hidden_act != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf.hidden_act!r} is not supported (expected 'silu')")
    fields = {f: getattr(hf, f) for f in QWEN2_SHARED_FIELDS}
    fields["tie_word_embeddings"] = bool(fields["tie_word_embeddings"])
    config = DenseConfig(**fields, rope_theta=_rope_theta(hf)).validate()
    if getattr(hf, "head_dim", None) not in (None, config.head_dim):
        raise CheckpointError(f"{where}: head_dim {hf.head_dim} != hidden_size/num_attention_heads")
    return config


def _import_llava(d: Path, hf) -> torch.nn.Module:
    from transformers import LlavaForConditionalGeneration

    where = str(d / "config.json")
    if hf.text_config.model_type != "qwen2":
        raise CheckpointError(f"{where}: LLaVA's language model must be qwen2, got {hf.text_config.model_type!r}")
    text = _dense_config_from_qwen2(hf.text_config, where)
    text.tie_word_embeddings = bool(getattr(hf, "tie_word_embeddings", text.tie_word_embeddings))
    config = vlm_config_from_llava(hf, text.to_dict())
    state = LlavaForConditionalGeneration.from_pretrained(str(d)).state_dict()
    model = build_model(config)
    load_state_strict(model, from_llava_state(state), str(d))
    return model


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint dir itself or a training run's output dir."""
    p = Path(path)
    if (p / CONFIG_FILE).exists():
        return p
    if (p / LATEST_FILE).exists():
        name = (p / LATEST_FILE).read_text().strip()
        ckpt = p / "checkpoints" / name
        if (ckpt / CONFIG_FILE).exists():
            return ckpt
        raise CheckpointError(f"{p / LATEST_FILE} names {name!r}, which is not a complete checkpoint")
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    raise CheckpointError(f"{p}: not a checkpoint (no {CONFIG_FILE} and no '{LATEST_FILE}' file)")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Our model from one of our checkpoints, a run directory, or a transformers directory."""
    p = Path(path)
    if (p / "config.json").exists() and not (p / CONFIG_FILE).exists():
        return import_hf(p).to(device)
    return load_model(resolve_checkpoint(p), device)
