"""GGUF export: the file read back with the `gguf` package holds our weights under llama.cpp's names
(dequantized: exact in f32, within q8_0's step otherwise), the architecture's hyperparameters, and the
tokenizer with Qwen2's pre-tokenizer (our split regex is Qwen2's, so the claim holds); and, where
llama.cpp is built (`make llama-cpp`, slow), llama.cpp's own logits and greedy tokens equal ours."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from models import DenseLM, MoELM, make_config, save_model
from models.convert import export_gguf

ROOT = Path(__file__).resolve().parents[1]
LLAMA_PYTHON = ROOT / ".cache" / "llama-cpp" / "bin" / "python"
LLAMA_BUILT = ROOT / ".cache" / "llama-cpp" / ".built"  # written by `make llama-cpp`

CONFIGS = {
    "dense": ("dense", dict(tie_word_embeddings=True)),
    "moe": ("moe", dict(n_group=2, topk_group=1, n_routed_experts=6, routed_scaling_factor=2.5)),
    "moe_q_lora": ("moe", dict(q_lora_rank=32, first_k_dense_replace=0, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer_dir, tokenizer):
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for name, (kind, overrides) in CONFIGS.items():
        torch.manual_seed(0)
        cls = DenseLM if kind == "dense" else MoELM
        model = cls(make_config(kind, "micro", vocab_size=len(tokenizer), **overrides)).eval()
        with torch.no_grad():  # non-trivial norms, biases and routing bias
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            for n, b in model.named_buffers():
                if n.endswith("e_score_correction_bias"):
                    b.copy_(torch.randn_like(b) * 0.1)
        save_model(model, d / name, tokenizer_dir)
        out[name] = (d / name, model)
    return out


def _read(path: Path):
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            parts = [field.parts[i] for i in field.data]
            if field.types[-1] == gguf.GGUFValueType.STRING:
                fields[key] = [bytes(p).decode() for p in parts]
            else:
                fields[key] = [p.tolist()[0] for p in parts]
        elif field.types[0] == gguf.GGUFValueType.STRING:
            fields[key] = bytes(field.parts[field.data[0]]).decode()
        else:
            fields[key] = field.parts[field.data[0]].tolist()[0]
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type not in (0, 1) else t.data
        tensors[t.name] = torch.from_numpy(np.array(data, dtype=np.float32))
    return fields, tensors


def test_our_split_regex_is_qwen2s():
    from transformers.models.qwen2 import tokenization_qwen2

    from train.data.tokenizer import SPLIT_PATTERN

    assert SPLIT_PATTERN == tokenization_qwen2.PRETOKENIZE_REGEX


def test_dense_gguf_holds_the_weights_the_vocabulary_and_the_template(checkpoints, tokenizer, tmp_path):
    from models.chat_format import CHAT_TEMPLATE

    ckpt, model = checkpoints["dense"]
    fields, tensors = _read(export_gguf(ckpt, tmp_path / "dense.gguf", "f32"))
    c = model.config
    assert fields["general.architecture"] == "qwen2"
    assert fields["qwen2.block_count"] == c.num_hidden_layers and fields["qwen2.attention.head_count_kv"] == 2
    assert fields["qwen2.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "qwen2"
    vocab = {t: i for i, t in enumerate(fields["tokenizer.ggml.tokens"])}
    assert all(vocab[t] == i for t, i in tokenizer.get_vocab().items())
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("<think>")] == gguf.TokenType.USER_DEFINED  # kept when decoding
    state = model.state_dict()
    assert torch.equal(tensors["token_embd.weight"], state["model.embed_tokens.weight"])
    assert "output.weight" not in tensors  # tied: llama.cpp uses the embedding
    for i in range(c.num_hidden_layers):
        assert torch.equal(tensors[f"blk.{i}.attn_q.bias"], state[f"model.layers.{i}.self_attn.q_proj.bias"])
        assert torch.equal(tensors[f"blk.{i}.ffn_down.weight"], state[f"model.layers.{i}.mlp.down_proj.weight"])


@pytest.mark.parametrize("fmt", ["f16", "bf16", "q8_0"])
def test_reduced_precision_weights_are_within_their_step(checkpoints, tmp_path, fmt):
    ckpt, model = checkpoints["dense"]
    _, tensors = _read(export_gguf(ckpt, tmp_path / f"dense-{fmt}.gguf", fmt))
    w = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    got = tensors["blk.0.ffn_up.weight"]
    step = {"f16": 1e-3, "bf16": 8e-3, "q8_0": 1.0 / 127}[fmt]
    assert (got - w).abs().max() <= step * w.abs().max() and not torch.equal(got, w)
    assert tensors["blk.0.attn_norm.weight"].dtype == torch.float32  # norms stay f32


@pytest.mark.parametrize("name", ["moe", "moe_q_lora"])
def test_moe_gguf_splits_mla_and_stacks_the_experts(checkpoints, tmp_path, name):
    from models.convert.deepseek_v3 import to_deepseek_state

    ckpt, model = checkpoints[name]
    fields, tensors = _read(export_gguf(ckpt, tmp_path / f"{name}.gguf", "f32"))
    c = model.config
    assert fields["general.architecture"] == "deepseek2"
    assert fields["deepseek2.attention.q_lora_rank"] == (c.q_lora_rank or 0)  # llama.cpp needs the key, 0 or not
    assert fields["deepseek2.expert_gating_func"] == gguf.ExpertGatingFuncType.SIGMOID
    assert fields["deepseek2.expert_group_count"] == c.n_group
    assert fields["deepseek2.expert_weights_scale"] == pytest.approx(c.routed_scaling_factor)
    assert fields["deepseek2.attention.head_count_kv"] == 1
    assert fields["deepseek2.leading_dense_block_count"] == c.first_k_dense_replace
    state = to_deepseek_state(model.state_dict(), c)
    layer = c.num_hidden_layers - 1  # an MoE layer
    k_b, v_b = tensors[f"blk.{layer}.attn_k_b.weight"], tensors[f"blk.{layer}.attn_v_b.weight"]
    kv_b = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, c.kv_lora_rank)
    assert torch.equal(kv_b, state[f"model.layers.{layer}.self_attn.kv_b_proj.weight"])
    experts = tensors[f"blk.{layer}.ffn_down_exps.weight"]
    assert experts.shape[0] == c.n_routed_experts
    assert torch.equal(experts[3], state[f"model.layers.{layer}.mlp.experts.3.down_proj.weight"])
    bias = state[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
    assert torch.equal(tensors[f"blk.{layer}.exp_probs_b.bias"], bias)


def test_gguf_export_refuses_what_it_cannot_write(checkpoints, tmp_path, cli_error):
    ckpt, _ = checkpoints["dense"]
    (tmp_path / "notes.txt").write_text("mine")
    cli_error(
        ["export", "--checkpoint", str(ckpt), "--format", "gguf", "--out", str(tmp_path / "notes.txt")],
        "is not a GGUF file",
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"
    cli_error(["export", "--checkpoint", str(ckpt), "--format", "gguf", "--out", str(tmp_path)], "a directory")
    cli_error(
        ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--gguf-type", "q8_0"], "--gguf-type"
    )


# ----------------------------------------------------------------------------- llama.cpp itself

LLAMA_PROBE = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, prompt, n_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, flash_attn=False,
            type_k=0, type_v=0, n_threads=2, seed=0)  # f32 KV cache, no flash attention
llm.eval(prompt)
logits = np.array(llm.scores[: len(prompt)]).tolist()
llm.reset()
tokens = []
for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
    tokens.append(int(t))
    if len(tokens) == n_new:
        break
text = "Café 東京 🎉 <think>x</think> 12 + 30 = 42<|im_end|>"
ids = llm.tokenize(text.encode(), add_bos=False, special=True)
print(json.dumps({"logits": logits, "tokens": tokens, "ids": ids}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not LLAMA_BUILT.exists(), reason="llama.cpp is not built here: `make llama-cpp` builds it")
@pytest.mark.parametrize("name", ["dense", "moe", "moe_q_lora"])
def test_llama_cpp_gives_our_logits_and_greedy_tokens(checkpoints, tokenizer, tmp_path, name):
    from models.generate import generate

    ckpt, model = checkpoints[name]
    path = export_gguf(ckpt, tmp_path / f"{name}.gguf", "f32")
    prompt = tokenizer.encode("What is 12 + 30? Let me think.", add_special_tokens=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run(
        [str(LLAMA_PYTHON), "-c", LLAMA_PROBE, str(path), json.dumps(prompt), "12"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(r.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ours = model(torch.tensor([prompt])).logits[0]
    diff = (torch.tensor(theirs["logits"]) - ours).abs().max().item()
    print(f"{name}: max |logit difference| llama.cpp vs ours = {diff:.2e}")
    assert diff < 1e-3
    assert theirs["tokens"] == generate(model, [prompt], 12)[0]
    text = "Café 東京 🎉 <think>x</think> 12 + 30 = 42<|im_end|>"
    assert theirs["ids"] == tokenizer.encode(text, add_special_tokens=False)
