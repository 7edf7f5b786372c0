"""Exports that the tools outside transformers 5 read correctly: DeepSeek-V3's own config keys that
routing depends on (llama.cpp's converter and vLLM fall back to softmax routing without them), the
rope keys transformers 4.x reads, and a tokenizer that transformers 4.57 (the version llama.cpp's
converter and vLLM's CPU build pin) loads with the same ids, special tokens and chat template."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import DenseLM, MoELM, export_hf, make_config, save_model
from models.chat_format import IM_END, IM_START, IMAGE

ROOT = Path(__file__).resolve().parents[1]
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_dir, tokenizer):
    d = tmp_path_factory.mktemp("interop")
    torch.manual_seed(0)
    models = {
        "dense": DenseLM(make_config("dense", "micro", vocab_size=len(tokenizer), rope_theta=50000.0)),
        "moe": MoELM(make_config("moe", "micro", vocab_size=len(tokenizer), n_group=2, topk_group=1)),
        "moe_yarn": MoELM(make_config("moe", "micro", vocab_size=len(tokenizer), rope_scaling=YARN)),
    }
    out = {}
    for name, model in models.items():
        save_model(model, d / name, tokenizer_dir)
        out[name] = export_hf(d / name, d / f"{name}-hf")
    return out


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_deepseek_export_carries_the_routing_and_rope_keys_of_deepseeks_config(exports):
    c = _config(exports["moe"])
    assert c["scoring_func"] == "sigmoid" and c["topk_method"] == "noaux_tc"
    assert c["n_group"] == 2 and c["topk_group"] == 1 and c["moe_layer_freq"] == 1
    assert c["rope_theta"] == 10000.0 and c["rope_scaling"] is None
    y = _config(exports["moe_yarn"])
    assert y["rope_scaling"]["type"] == "yarn" and y["rope_scaling"]["factor"] == 4.0
    assert y["rope_scaling"]["original_max_position_embeddings"] == 64
    # transformers 5 still reads the export as it did (its own keys win)
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(exports["moe_yarn"]))
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0


def test_qwen2_export_writes_rope_theta_at_the_top_level(exports):
    assert _config(exports["dense"])["rope_theta"] == 50000.0


def test_tokenizer_config_is_readable_by_transformers_4_and_5(exports, tokenizer):
    config = json.loads((exports["dense"] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in config  # 5.x writes it as a list; 4.x expects a dict and fails
    assert {IM_START, IM_END, IMAGE} <= set(config["additional_special_tokens"])
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(exports["dense"]))
    assert set(loaded.all_special_tokens) == set(tokenizer.all_special_tokens)


PROBE = """
import json, sys
from transformers import AutoConfig, AutoTokenizer, __version__
out = {"version": __version__}
for name in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(name)
    text = "Café (cafe\\u0301) 東京 🎉 <think>x</think> 12 + 30 = 42<|im_end|>"
    conf = AutoConfig.from_pretrained(name)
    out[name] = {
        "ids": tok.encode(text, add_special_tokens=False),
        "special": sorted(tok.all_special_tokens),
        "decoded": tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True),
        "template": tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        ),
        "rope_theta": getattr(conf, "rope_theta", None),
        "scoring_func": getattr(conf, "scoring_func", None),
    }
print(json.dumps(out))
"""


def _transformers4_python() -> Path:
    """A virtual environment with transformers 4.57 (no torch: tokenizers and configs only), kept
    under .cache/ between runs."""
    venv = ROOT / ".cache" / "transformers-4.57"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "transformers==4.57.6", "jinja2"],
            check=True,
            capture_output=True,
        )
        stamp.write_text("transformers==4.57.6\n")
    return python


def _probe(python, names: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run([str(python), "-c", PROBE, *names], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_the_exports_load_in_transformers_4_57_alike(exports):
    names = [str(exports["dense"]), str(exports["moe"])]
    theirs, ours = _probe(_transformers4_python(), names), _probe(sys.executable, names)
    assert theirs["version"].startswith("4.57") and ours["version"].startswith("5.")
    for name in names:
        for key in ("ids", "special", "decoded", "template"):
            assert theirs[name][key] == ours[name][key], (name, key)
    assert theirs[names[0]]["rope_theta"] == 50000.0  # 4.x reads it from the top level
    assert theirs[names[1]]["scoring_func"] == "sigmoid"


def test_the_text_generation_pipeline_returns_the_reasoning_apart(scripted_checkpoint, tmp_path):
    from transformers import pipeline

    checkpoint, reasoning, answer = scripted_checkpoint
    hf = export_hf(checkpoint, tmp_path / "hf")
    chat = pipeline("text-generation", model=str(hf), device="cpu")
    out = chat([{"role": "user", "content": "What is 40 + 2?"}], max_new_tokens=30, do_sample=False)
    message = out[0]["generated_text"][-1]
    assert message == {"role": "assistant", "reasoning_content": reasoning, "content": answer}
