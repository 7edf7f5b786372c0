"""Our MoE model <-> transformers' native `DeepseekV3ForCausalLM`.

Our parameter names are transformers' except for two things, handled here:
- routed experts: we hold `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I];
  checkpoints on disk (what `save_pretrained` writes and `from_pretrained` reads) have one key per expert,
  `mlp.experts.{e}.gate_proj.weight` [I, H], `.up_proj.weight` [I, H], `.down_proj.weight` [H, I];
- multi-token prediction: our `mtp.*` becomes layer N = num_hidden_layers in DeepSeek-V3's layout
  (`model.layers.N.{enorm,hnorm,eh_proj}`, `model.layers.N.shared_head.norm`, the decoder block's own keys),
  which transformers' model skips on load and DeepSeek-format inference engines read.
The rope layout is DeepSeek's interleaved one (`rope_interleave=True`).

A directory written by transformers itself carries `num_nextn_predict_layers` (DeepseekV3Config's default
is 1) but no MTP weights, because transformers' model has no MTP module: such a directory loads without
MTP, and says so in one line. A directory that does carry layer N loads with MTP.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ..chat_format import ENDOFTEXT, PAD
from ..checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    add_config_keys,
    load_state_strict,
    read_hf_weights,
    save_weights,
)
from ..config import MoEConfig
from ..registry import build_model

MODEL_TYPE = "moe"
HF_MODEL_TYPE = "deepseek_v3"
log = logging.getLogger(__name__)

# MoEConfig fields that DeepseekV3Config has under the same name and meaning.
SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_shared_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "first_k_dense_replace",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "initializer_range",
)
_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_HF_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_RENAMES = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "norm.weight": "shared_head.norm.weight",
}
_MTP_NAMES = {v: k for k, v in _MTP_RENAMES.items()}  # DeepSeek's layer-N names -> ours


def hf_config(config: MoEConfig, special: dict[str, int]):
    from transformers import DeepseekV3Config

    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        extra = {k: v for k, v in config.rope_scaling.items() if k not in ("type", "rope_type")}
        rope = {"rope_type": "yarn", "rope_theta": config.rope_theta, **extra}
    return DeepseekV3Config(
        **{f: getattr(config, f) for f in SHARED_FIELDS},
        num_key_value_heads=config.num_attention_heads,
        rope_parameters=rope,
        rope_interleave=True,
        attention_bias=False,
        hidden_act="silu",
        num_mtp_layers=config.num_mtp_layers,
        bos_token_id=None,
        eos_token_id=special.get(ENDOFTEXT),
        pad_token_id=special.get(PAD),
        architectures=["DeepseekV3ForCausalLM"],
    )


def reference_keys(config: MoEConfig) -> dict:
    """Keys of DeepSeek-V3's own config.json that transformers' DeepseekV3Config does not write but other
    consumers read: llama.cpp's converter and vLLM fall back to softmax routing without `scoring_func`
    and `topk_method`, and transformers 4.x reads `rope_theta`/`rope_scaling` at the top level."""
    keys = {
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "moe_layer_freq": 1,
        "ep_size": 1,
        "seq_aux": True,
        "aux_loss_alpha": config.aux_loss_alpha,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
    }
    if config.rope_scaling is not None:
        extra = {k: v for k, v in config.rope_scaling.items() if k not in ("type", "rope_type")}
        keys["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", **extra}
    return keys


def export(model, special: dict[str, int], out: Path) -> None:
    hf_config(model.config, special).save_pretrained(out)
    add_config_keys(out, reference_keys(model.config))
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_weights({k: v.contiguous() for k, v in to_deepseek_state(state, model.config).items()}, out / WEIGHTS_FILE)


def mtp_layers_in_config(hf) -> int:
    """The MTP depth a DeepseekV3 config asks for (`num_nextn_predict_layers`, `num_mtp_layers` in
    transformers 5)."""
    for name in ("num_nextn_predict_layers", "num_mtp_layers"):
        value = getattr(hf, name, None)
        if value is not None:
            return int(value)
    return 0


def config_from_hf(hf, where: str, has_mtp_weights: bool = True) -> MoEConfig:
    if getattr(hf, "attention_bias", False):
        raise CheckpointError(f"{where}: attention_bias=True is not supported")
    if not getattr(hf, "rope_interleave", True):
        raise CheckpointError(f"{where}: rope_interleave=False is not supported (DeepSeek's layout is interleaved)")
    if hf.hidden_act != "silu":
        raise CheckpointError(f"{where}: hidden_act {hf.hidden_act!r} is not supported (expected 'silu')")
    if hf.num_key_value_heads != hf.num_attention_heads:
        raise CheckpointError(f"{where}: MLA needs num_key_value_heads == num_attention_heads")
    params = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = params.pop("rope_type", "default")
    theta = params.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
    scaling = None
    if rope_type == "yarn":
        scaling = {"type": "yarn", **{k: v for k, v in params.items() if v is not None}}
    elif rope_type != "default":
        raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported (default or yarn)")
    fields = {f: getattr(hf, f) for f in SHARED_FIELDS}
    fields["tie_word_embeddings"] = bool(fields["tie_word_embeddings"])
    mtp = min(mtp_layers_in_config(hf), 1)
    if mtp and not has_mtp_weights:
        log.warning(
            f"{where}: asks for {mtp_layers_in_config(hf)} MTP layer(s) but the weights have none (as "
            "transformers writes them); loading without multi-token prediction"
        )
        mtp = 0
    return MoEConfig(**fields, rope_theta=float(theta), rope_scaling=scaling, num_mtp_layers=mtp).validate()


def load(d: Path, hf):
    state = read_hf_weights(d)
    mtp_prefix = f"model.layers.{hf.num_hidden_layers}."
    config = config_from_hf(hf, str(d / "config.json"), any(k.startswith(mtp_prefix) for k in state))
    model = build_model(config)
    load_state_strict(model, from_deepseek_state(state, config), str(d))
    return model


def to_deepseek_state(state: dict[str, torch.Tensor], config: MoEConfig) -> dict[str, torch.Tensor]:
    n = config.num_hidden_layers
    renamed = {}
    for key, value in state.items():
        if key.startswith("mtp.block."):
            key = f"model.layers.{n}.{key[len('mtp.block.') :]}"
        elif key.startswith("mtp."):
            key = f"model.layers.{n}.{_MTP_RENAMES[key[len('mtp.') :]]}"
        renamed[key] = value
    out = {}
    for key, value in renamed.items():
        m = _EXPERTS.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, kind = m.groups()
        for e in range(value.shape[0]):
            if kind == "gate_up_proj":
                gate, up = value[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = value[e].contiguous()
    return out


def from_deepseek_state(state: dict[str, torch.Tensor], config: MoEConfig) -> dict[str, torch.Tensor]:
    """The inverse of to_deepseek_state; transformers' fused in-memory names are accepted too."""
    n = config.num_hidden_layers
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    out = {}
    for key, value in state.items():
        m = _HF_EXPERT.match(key)
        if m is not None:
            prefix, e, kind = m.groups()
            experts.setdefault((prefix, kind), {})[int(e)] = value
            continue
        out[key] = value
    for (prefix, kind), by_index in list(experts.items()):
        stacked = torch.stack([by_index[e] for e in sorted(by_index)])
        if kind == "down_proj":
            out[f"{prefix}.down_proj"] = stacked
        elif kind == "gate_proj":
            ups = experts[(prefix, "up_proj")]
            out[f"{prefix}.gate_up_proj"] = torch.cat((stacked, torch.stack([ups[e] for e in sorted(ups)])), dim=1)
    mtp_prefix = f"model.layers.{n}."
    renamed = {}
    for key, value in out.items():
        if not key.startswith(mtp_prefix):
            renamed[key] = value
            continue
        rest = key[len(mtp_prefix) :]
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            continue  # DeepSeek's files repeat the shared embedding and head here
        if rest in _MTP_NAMES:
            renamed[f"mtp.{_MTP_NAMES[rest]}"] = value
        elif config.num_mtp_layers:
            renamed[f"mtp.block.{rest}"] = value
        # without an MTP module in the config, the layer's weights are not part of the model
    return renamed
