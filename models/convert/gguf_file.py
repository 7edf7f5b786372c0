"""Export to GGUF, the file format of llama.cpp (and Ollama, LM Studio and the other programs built on it).

One file holds the weights, the architecture's hyperparameters and the tokenizer. The dense model is
llama.cpp's `qwen2` architecture, the MoE model its `deepseek2` (which covers DeepSeek-V3: sigmoid
scoring, the routing bias, expert groups). The tokenizer is byte-level BPE ("gpt2" in GGUF) with
Qwen2's pre-tokenizer: our split regex is Qwen2's (tests/test_gguf.py holds them equal), so the file
says `tokenizer.ggml.pre = "qwen2"` and llama.cpp needs no patched converter. llama.cpp does not
apply the NFC normalisation our tokenizer does: text already in NFC (almost all text) gets the same
ids; decomposed accents may not.

Weights: `f32`, `f16`, `bf16`, or `q8_0` (blocks of 32 int8 values with one f16 scale). Norm weights,
biases and the routing bias stay f32, as llama.cpp's own converter keeps them; a matrix whose rows
are not a multiple of 32 long stays f16 under q8_0.

The layout changes from transformers' names are llama.cpp's: every tensor gets its GGUF name, the
experts of a layer are stacked into one [experts, out, in] tensor, and MLA's kv_b_proj is split into
the key part (transposed, for the absorbed decode) and the value part, with the attention declared as
one shared latent head (MQA over kv_lora_rank + qk_rope_head_dim).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..chat_format import CHAT_TEMPLATE, ENDOFTEXT, IM_END, NON_SPECIAL_ADDED, PAD
from ..checkpoint import CheckpointError
from .deepseek_v3 import to_deepseek_state

FORMATS = ("f32", "f16", "bf16", "q8_0")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


def _vocab(tokenizer_dir: Path, vocab_size: int):
    """(tokens by id, their GGUF token types, merges as 'a b' strings, ids by content of added tokens)."""
    gguf = _gguf()
    path = tokenizer_dir / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{tokenizer_dir}: GGUF export needs the tokenizer (no tokenizer.json here)")
    spec = json.loads(path.read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: a {model.get('type')} tokenizer; GGUF export handles byte-level BPE")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = token, gguf.TokenType.NORMAL
    added = {}
    for t in spec.get("added_tokens", []):
        if t["id"] < vocab_size:
            tokens[t["id"]] = t["content"]
            special = t["special"] and t["content"] not in NON_SPECIAL_ADDED
            types[t["id"]] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
            added[t["content"]] = t["id"]
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges, added


def _add_tokenizer(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    tokens, types, merges, added = _vocab(tokenizer_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # our split regex is Qwen2's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if ENDOFTEXT in added:
        writer.add_eos_token_id(added[ENDOFTEXT])
    if IM_END in added:
        writer.add_eot_token_id(added[IM_END])  # a chat reply ends here
    if PAD in added:
        writer.add_pad_token_id(added[PAD])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _array(t: torch.Tensor, fmt: str, name: str):
    """(numpy data, raw GGML type or None) for one tensor in the chosen format."""
    gguf = _gguf()
    x = t.detach().float().cpu().numpy()
    keep_f32 = x.ndim == 1 or name.endswith(("_norm.weight", ".bias", "exp_probs_b.bias"))
    if fmt == "f32" or keep_f32:
        return x.astype(np.float32), None
    if fmt == "f16":
        return x.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if fmt == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if kind == gguf.GGMLQuantizationType.Q8_0 and x.shape[-1] % 32:
        return x.astype(np.float16), None
    return gguf.quants.quantize(x, kind), kind


def _dense_tensors(model) -> dict[str, torch.Tensor]:
    c = model.config
    out = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    if not c.tie_word_embeddings:
        out["output.weight"] = model.lm_head.weight
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i, layer in enumerate(model.model.layers):
        state = layer.state_dict()
        for ours, theirs in names.items():
            out[f"blk.{i}.{theirs}"] = state[ours]
    return out


def _common_params(writer, c, head_count_kv: int) -> None:
    """The hyperparameters every architecture declares."""
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(head_count_kv)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)


def _dense_params(writer, c) -> None:
    _common_params(writer, c, c.num_key_value_heads)


# DeepSeek-V3 (transformers names, from to_deepseek_state) -> GGUF names, per layer
_MOE_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}


def _moe_tensors(model) -> dict[str, torch.Tensor]:
    c = model.config
    state = to_deepseek_state(model.state_dict(), c)
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not c.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in _MOE_NAMES.items():
            if prefix + ours in state:
                out[f"blk.{i}.{theirs}"] = state[prefix + ours]
        kv_b = state[prefix + "self_attn.kv_b_proj.weight"]
        per_head = kv_b.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        k_b, v_b = per_head.split([c.qk_nope_head_dim, c.v_head_dim], dim=1)
        out[f"blk.{i}.attn_k_b.weight"] = k_b.transpose(1, 2).contiguous()  # [heads, rank, nope]
        out[f"blk.{i}.attn_v_b.weight"] = v_b.contiguous()  # [heads, v, rank]
        if i >= c.first_k_dense_replace:
            for proj, theirs in (
                ("gate_proj", "ffn_gate_exps"),
                ("up_proj", "ffn_up_exps"),
                ("down_proj", "ffn_down_exps"),
            ):
                experts = [state[f"{prefix}mlp.experts.{e}.{proj}.weight"] for e in range(c.n_routed_experts)]
                out[f"blk.{i}.{theirs}.weight"] = torch.stack(experts)
    return out


def _moe_params(writer, c) -> None:
    gguf = _gguf()
    _common_params(writer, c, 1)  # MLA decodes as one shared latent head
    writer.add_leading_dense_block_count(c.first_k_dense_replace)
    writer.add_vocab_size(c.vocab_size)
    writer.add_q_lora_rank(c.q_lora_rank or 0)  # 0: a plain q_proj (llama.cpp requires the key)
    writer.add_kv_lora_rank(c.kv_lora_rank)
    writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    writer.add_value_length(c.kv_lora_rank)
    writer.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_expert_count(c.n_routed_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_expert_shared_count(c.n_shared_experts)
    writer.add_expert_weights_scale(c.routed_scaling_factor)
    writer.add_expert_weights_norm(c.norm_topk_prob)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_group_count(c.n_group)
    writer.add_expert_group_used_count(c.topk_group)
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    if c.rope_scaling is not None:
        rs = c.rope_scaling
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rs["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        if rs.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(0.1 * float(rs["mscale_all_dim"]))


ARCHITECTURES = {"dense": ("qwen2", _dense_params, _dense_tensors), "moe": ("deepseek2", _moe_params, _moe_tensors)}


def export_gguf(model, tokenizer_dir: Path, out_file: Path, fmt: str = "f16", name: str | None = None) -> Path:
    """Write `model` (dense or MoE) with the tokenizer in tokenizer_dir as one GGUF file, under a
    temporary name first and renamed into place."""
    gguf = _gguf()
    if fmt not in FORMATS:
        raise CheckpointError(f"GGUF type {fmt!r}: choose one of {', '.join(FORMATS)}")
    kind = model.config.model_type
    if kind not in ARCHITECTURES:
        raise CheckpointError(f"GGUF export covers the dense and the MoE model, not {kind!r}")
    arch, add_params, tensors = ARCHITECTURES[kind]
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(name or out_file.stem)
        add_params(writer, model.config)
        file_type = {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[fmt]  # llama_ftype: ALL_F32, MOSTLY_F16, ...
        writer.add_file_type(file_type)
        _add_tokenizer(writer, Path(tokenizer_dir), model.config.vocab_size)
        for tensor_name, t in tensors(model).items():
            data, raw = _array(t, fmt, tensor_name)
            writer.add_tensor(tensor_name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_file)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_file
