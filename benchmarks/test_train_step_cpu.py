"""One CPU training step (forward + backward + AdamW) of our dense model against transformers'
Qwen2ForCausalLM with the identical config, weights and batch.

    make bench        (runs this, then writes benchmarks/results/<date>-cpu-train-step.md)
"""

import pytest
import torch

from models import DenseLM, make_config

CONFIG = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
BATCH, SEQ = 8, 256


def _models():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    ours = DenseLM(make_config("dense", **CONFIG))
    hf_cfg = Qwen2Config(
        **{k: v for k, v in CONFIG.items()}, rope_theta=10000.0, rms_norm_eps=1e-6, attn_implementation="sdpa"
    )
    theirs = Qwen2ForCausalLM(hf_cfg)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _step_fn(model, ours: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ + 1), generator=g)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step():
        if ours:
            loss = model(inputs, targets=targets).loss
        else:  # transformers shifts labels itself: pass the unshifted ids
            loss = model(input_ids=ids[:, :-1], labels=torch.cat([ids[:, :1], targets], 1)[:, :-1]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


@pytest.mark.parametrize("impl", ["ours", "transformers"])
def test_train_step(benchmark, impl):
    ours, theirs = _models()
    model = ours if impl == "ours" else theirs
    model.train()
    step = _step_fn(model, impl == "ours")
    step()  # warm up
    benchmark.extra_info.update(
        impl=impl, batch=BATCH, seq=SEQ, tokens=BATCH * SEQ, parameters=sum(p.numel() for p in model.parameters())
    )
    benchmark.pedantic(step, rounds=15, iterations=1, warmup_rounds=2)
