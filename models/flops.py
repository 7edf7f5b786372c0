"""Training FLOPs from a model's config, for MFU (model FLOPs utilisation): achieved FLOP/s over the
device's peak.

What is counted: every matrix multiply of the forward pass (2 FLOPs per multiply-add), attention's two
sequence-length products (Q K^T and P V) over the full row length T (not halved for causality: that is
what the kernels compute with a dense mask, and what FlopCounterMode counts for SDPA), and the backward
pass as twice the forward (one product for the input gradient, one for the weight gradient): 3x in all.
Not counted: element-wise work (norms, activations, rotary, softmax, the loss), which is small beside
the products and not what a matmul peak measures. The MoE model counts only the experts a token is sent
to (num_experts_per_tok routed + the shared ones), the router, and the multi-token-prediction blocks;
the VLM counts its vision tower per image (patch convolution, encoder, projector) beside the language
model over every position, image tokens included. `tests/test_flops.py` holds each family's count
against torch.utils.flop_counter.FlopCounterMode.
"""

from __future__ import annotations

# Peak dense bf16 matmul throughput (FLOP/s) by device name, from the vendors' data sheets (without sparsity).
PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "MI300X": 1307e12,
}


def peak_flops(device_name: str) -> float | None:
    """The table's peak for a device name such as torch.cuda.get_device_name() returns (the longest key
    found in it), or None for a device it does not know (and for CPUs)."""
    matches = [k for k in PEAK_BF16 if k.lower() in device_name.lower()]
    return PEAK_BF16[max(matches, key=len)] if matches else None


def _dense_layer(c, t: int) -> float:
    """Forward FLOPs per token of one Qwen2 decoder layer at row length t."""
    d, hd = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    proj = 2 * d * (q + 2 * kv) + 2 * q * d
    attention = 2 * 2 * t * q  # Q K^T and P V
    mlp = 3 * 2 * d * c.intermediate_size
    return proj + attention + mlp


def _moe_layer(c, t: int, dense_mlp: bool) -> float:
    """Forward FLOPs per token of one DeepSeek-V3 decoder layer (MLA + a dense MLP or the MoE block)."""
    d, h = c.hidden_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    q = 2 * d * h * qk if c.q_lora_rank is None else 2 * d * c.q_lora_rank + 2 * c.q_lora_rank * h * qk
    kv = 2 * d * (c.kv_lora_rank + c.qk_rope_head_dim) + 2 * c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)
    attention = 2 * t * h * qk + 2 * t * h * c.v_head_dim
    out = 2 * h * c.v_head_dim * d
    if dense_mlp:
        mlp = 3 * 2 * d * c.intermediate_size
    else:
        experts = c.num_experts_per_tok + c.n_shared_experts
        mlp = 2 * d * c.n_routed_experts + experts * 3 * 2 * d * c.moe_intermediate_size
    return q + kv + attention + out + mlp


def forward_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs per token position of the language model at row length seq_len."""
    c = config.text_config if config.model_type == "vlm" else config
    head = 2 * c.hidden_size * c.vocab_size
    if c.model_type == "dense":
        return c.num_hidden_layers * _dense_layer(c, seq_len) + head
    layers = sum(_moe_layer(c, seq_len, dense_mlp=i < c.first_k_dense_replace) for i in range(c.num_hidden_layers))
    mtp = c.num_mtp_layers * (2 * 2 * c.hidden_size * c.hidden_size + _moe_layer(c, seq_len, False) + head)
    return layers + head + mtp


def vision_forward_flops_per_image(config) -> float:
    """Forward FLOPs of the VLM's vision tower and projector for one image."""
    c = config
    p, d = c.grid * c.grid, c.vision_hidden_size
    patch = p * 2 * (c.num_channels * c.patch_size * c.patch_size) * d
    block = p * (4 * 2 * d * d + 2 * 2 * p * d + 2 * 2 * d * c.vision_intermediate_size)
    r = c.pixel_shuffle
    tokens, width = p // (r * r), d * r * r
    projector = tokens * (2 * width * c.text_config.hidden_size + 2 * c.text_config.hidden_size**2)
    return patch + c.vision_num_layers * block + projector


def training_flops(config, batch: int, seq_len: int, images: int = 0) -> float:
    """FLOPs of one training step (forward and backward) over batch rows of seq_len, with `images`
    images through the vision tower (a VLM)."""
    text = batch * seq_len * forward_flops_per_token(config, seq_len)
    vision = images * vision_forward_flops_per_image(config) if images else 0.0
    return 3 * (text + vision)
