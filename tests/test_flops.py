"""Training FLOPs from the config (models/flops.py) against torch's FlopCounterMode over a real forward and
backward, for each family. On the CPU, PyTorch's fused attention op has no FLOP formula of its own: the
counter gets torch's own SDPA formulas for it here. The counter's attention backward includes the
recomputation of the scores (5 products where the forward has 2); models/flops.py counts the
backward as twice the forward (the MFU convention), so the two differ by half a forward attention
product, within the tolerance below at these sizes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from models import VLM, DenseLM, MoELM, VLMConfig, make_config
from models.flops import forward_flops_per_token, peak_flops, training_flops

aten = torch.ops.aten


def _flash_cpu(query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _flash_cpu_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _counted(model, ids, **kwargs) -> int:
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _flash_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_cpu_backward,
    }
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        model(ids, targets=ids, **kwargs).loss.backward()
    return counter.get_total_flops()


CASES = {
    "dense": ("dense", {}),
    "dense_gqa_untied": ("dense", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)),
    "moe": ("moe", {}),
    "moe_q_lora_mtp": ("moe", dict(q_lora_rank=32, num_mtp_layers=1, first_k_dense_replace=0, n_shared_experts=2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_text_model_flops_match_the_flop_counter(name):
    kind, overrides = CASES[name]
    torch.manual_seed(0)
    model = (DenseLM if kind == "dense" else MoELM)(make_config(kind, "micro", vocab_size=300, **overrides))
    b, t = 2, 64
    ids = torch.randint(0, 300, (b, t))
    counted, ours = _counted(model, ids), training_flops(model.config, b, t)
    assert abs(counted - ours) / counted < 0.03, (counted, ours)


def test_vlm_flops_match_the_flop_counter():
    torch.manual_seed(0)
    model = VLM(VLMConfig(text_config=make_config("dense", "micro", vocab_size=97).to_dict(), image_token_id=96))
    c, b, t = model.config, 2, 64
    row = [1, 7] + [96] * c.image_tokens
    ids = torch.tensor([row + list(range(10, 10 + t - len(row)))] * b)
    pixels = torch.randn(b, 3, c.image_size, c.image_size)
    counted, ours = _counted(model, ids, pixel_values=pixels), training_flops(c, b, t, images=b)
    assert abs(counted - ours) / counted < 0.03, (counted, ours)


def test_flops_grow_with_the_row_length_only_through_attention():
    c = make_config("dense", "tiny")
    per_token = forward_flops_per_token(c, 1024) - forward_flops_per_token(c, 512)
    assert per_token == c.num_hidden_layers * 2 * 2 * 512 * c.num_attention_heads * c.head_dim


def test_peak_table_reads_device_names():
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12  # the longer name wins
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None
