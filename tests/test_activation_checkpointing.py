"""Activation checkpointing (`--activation-checkpointing [K]`): every K-th decoder layer keeps no
activations and recomputes them in the backward. Gradients are bit-identical to keeping them, for the
dense model, the MoE model (MLA, routed experts, MTP) and the VLM; the MoE blocks' expert load counts are
not counted again by the recomputation; a pretraining run gives the same losses with it as without."""

from __future__ import annotations

import pytest
import torch

from models import VLM, DenseLM, MoELM, VLMConfig, make_config


def _grads_and_loads(model, every: int, ids, **kwargs):
    model.zero_grad()
    model.set_activation_checkpointing(every)
    for block in model.moe_blocks():
        block.load = None
    model(ids, targets=ids, **kwargs).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, [block.load.clone() for block in model.moe_blocks()]


MODELS = {
    "dense": lambda: DenseLM(make_config("dense", "micro", vocab_size=120, num_hidden_layers=3)),
    "moe_mtp": lambda: MoELM(make_config("moe", "micro", vocab_size=120, num_hidden_layers=3, num_mtp_layers=1)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("every", [1, 2])
def test_gradients_are_identical_with_checkpointing(name, every):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    ids = torch.randint(0, 120, (2, 32))
    ref_grads, ref_loads = _grads_and_loads(model, 0, ids)
    grads, loads = _grads_and_loads(model, every, ids)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert torch.equal(grads[n], ref_grads[n]), n
    assert all(torch.equal(a, b) for a, b in zip(loads, ref_loads))  # the recomputation is not counted


def test_vlm_gradients_are_identical_with_checkpointing():
    torch.manual_seed(0)
    model = VLM(VLMConfig(text_config=make_config("dense", "micro", vocab_size=97).to_dict(), image_token_id=96))
    c = model.config
    row = [1, 7] + [96] * c.image_tokens
    ids = torch.tensor([row + list(range(10, 40 - len(row)))] * 2)
    pixels = torch.randn(2, 3, c.image_size, c.image_size)
    ref, _ = _grads_and_loads(model.train(), 0, ids, pixel_values=pixels)
    got, _ = _grads_and_loads(model, 1, ids, pixel_values=pixels)
    assert all(torch.equal(got[n], ref[n]) for n in ref)


def test_checkpointing_saves_activation_memory():
    """What autograd keeps for the backward: far less with every layer checkpointed."""
    torch.manual_seed(0)
    model = DenseLM(make_config("dense", "micro", vocab_size=120, num_hidden_layers=6)).train()
    ids = torch.randint(0, 120, (2, 128))

    def saved_bytes(every: int) -> int:
        model.set_activation_checkpointing(every)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, targets=ids).loss.backward()
        return total

    kept, checkpointed = saved_bytes(0), saved_bytes(1)
    assert checkpointed < kept / 2, (kept, checkpointed)


def test_pretraining_with_checkpointing_gives_the_same_losses(micro_losses, tmp_path):
    assert micro_losses(tmp_path / "plain", steps=3) == micro_losses(
        tmp_path / "ckpt", "--activation-checkpointing", steps=3
    )
