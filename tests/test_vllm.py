"""Our exports served by vLLM (its CPU build, `make vllm`, in an environment of its own): the dense
model's greedy tokens equal ours. The MoE model's equal ours for a one-token prompt; beyond one token
vLLM 0.32's CPU rotary kernel leaves the strided query slice that its MLA layer hands it unrotated, and
its logits are ours without rotary positions. The test holds that too, so that a change on either side
shows (docs/serving.md)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from models import DenseLM, MoELM, export_hf, make_config, save_model
from models.generate import generate

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".cache" / "vllm" / "bin" / "python"
VLLM_BUILT = ROOT / ".cache" / "vllm" / ".built"  # written by `make vllm`

PROBE = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

def main():
    path, prompts = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4,
              gpu_memory_utilization=0.1)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in out]))

if __name__ == "__main__":
    main()
"""


def _vllm_greedy(hf_dir: Path, prompts: list[list[int]], tmp_path: Path) -> list[list[int]]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run(
        [str(VLLM_PYTHON), str(script), str(hf_dir), json.dumps(prompts)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, (r.stdout + r.stderr)[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_BUILT.exists(), reason="vLLM is not installed here: `make vllm` installs it")
def test_vllm_serves_our_exports(tokenizer_dir, tokenizer, tmp_path):
    prompt = tokenizer.encode("What is 12 + 30? Let me think.", add_special_tokens=False)
    torch.manual_seed(0)
    # vLLM's CPU attention wants real head sizes (64), and its CPU MLA kernel DeepSeek's latent (512 + 64)
    dense = _perturbed(
        DenseLM(
            make_config(
                "dense",
                "micro",
                vocab_size=len(tokenizer),
                hidden_size=128,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=256,
            )
        )
    )
    save_model(dense, tmp_path / "dense", tokenizer_dir)
    got = _vllm_greedy(export_hf(tmp_path / "dense", tmp_path / "dense-hf"), [prompt], tmp_path)
    assert got == [generate(dense, [prompt], 8)[0]]

    moe = _perturbed(
        MoELM(
            make_config(
                "moe",
                "micro",
                vocab_size=len(tokenizer),
                kv_lora_rank=512,
                qk_rope_head_dim=64,
                qk_nope_head_dim=32,
                v_head_dim=32,
                n_group=2,
                topk_group=1,
            )
        )
    )
    save_model(moe, tmp_path / "moe", tokenizer_dir)
    one = prompt[:1]
    got = _vllm_greedy(export_hf(tmp_path / "moe", tmp_path / "moe-hf"), [one, prompt[:2]], tmp_path)
    assert got[0][0] == generate(moe, [one], 1)[0][0]  # a single token: no position in play
    with torch.no_grad():  # two tokens: vLLM's CPU MLA gives what ours gives without rotary positions
        no_rope = moe(torch.tensor([prompt[:2]]), position_ids=torch.zeros(1, 2, dtype=torch.long)).logits[0, -1]
    assert got[1][0] == int(no_rope.argmax())
