"""The dense model against transformers' Qwen2ForCausalLM from the same weights, and its masks,
KV cache and strict loading."""

import pytest
import torch

from models import CheckpointError, DenseLM, export_hf, import_hf, load_pretrained, make_config, save_model
from models.generate import generate
from models.layers import build_attention_mask

CONFIGS = {
    # odd sizes: hidden 96, 6 heads of 16, 2 KV heads, 3 layers, tied embeddings
    "odd_tied": dict(
        vocab_size=301,
        hidden_size=96,
        intermediate_size=200,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=128,
        rope_theta=10000.0,
    ),
    # untied, multi-head KV (no grouping), larger theta
    "untied_mha": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        max_position_embeddings=128,
        rope_theta=1e6,
    ),
}


def _random_model(cfg_kwargs, seed=0):
    torch.manual_seed(seed)
    model = DenseLM(make_config("dense", **cfg_kwargs)).eval()
    with torch.no_grad():  # non-trivial norms and biases so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory, tokenizer_dir):
    from models.checkpoint import copy_tokenizer_files

    d = tmp_path_factory.mktemp(request.param)
    model = _random_model(CONFIGS[request.param])
    save_model(model, d / "ours")
    copy_tokenizer_files(tokenizer_dir, d / "ours")
    export_hf(d / "ours", d / "hf")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(d / "hf"), attn_implementation="eager").eval()
    return model, hf, d


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_logits_match_transformers(exported):
    model, hf, _ = exported
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, model.config.vocab_size, (3, 41))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert _rel(ours, theirs) < 1e-5
    assert (ours - theirs).abs().max().item() < 1e-4


def test_padded_batch_matches_transformers(exported):
    model, hf, _ = exported
    ids = torch.randint(7, model.config.vocab_size, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, position_ids=pos).logits
        theirs = hf(ids, attention_mask=mask, position_ids=pos).logits
    assert _rel(ours[mask.bool()], theirs[mask.bool()]) < 1e-5


def test_greedy_generation_matches_transformers(exported):
    from transformers import GenerationConfig

    model, hf, _ = exported
    prompts = [[11, 12, 13, 14, 15], [40, 41, 42]]
    ours = generate(model, prompts, 12)
    for p, new in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([p]),
                generation_config=GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=0),
            )
        assert out[0, len(p) :].tolist() == new


def test_import_round_trip_and_load_pretrained(exported):
    model, _, d = exported
    ids = torch.randint(0, model.config.vocab_size, (1, 17))
    for loaded in (import_hf(d / "hf"), load_pretrained(d / "hf"), load_pretrained(d / "ours")):
        assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_kv_cache_decoding_equals_full_forward():
    model = _random_model(CONFIGS["odd_tied"])
    ids = torch.randint(0, 301, (2, 23))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_kv_cache(2, 64)
        parts = [model(ids[:, :10], kv_cache=cache).logits]
        parts.append(model(ids[:, 10:15], kv_cache=cache).logits)  # several tokens with a cache in front
        parts += [model(ids[:, t : t + 1], kv_cache=cache).logits for t in range(15, 23)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_packed_documents_equal_separate_forwards():
    model = _random_model(CONFIGS["odd_tied"])
    a, b = torch.randint(7, 301, (9,)), torch.randint(7, 301, (14,))
    packed = torch.cat([a, b])[None]
    seg = torch.tensor([[0] * 9 + [1] * 14])
    pos = torch.tensor([list(range(9)) + list(range(14))])
    with torch.no_grad():
        got = model(packed, segment_ids=seg, position_ids=pos).logits[0]
        want = torch.cat([model(a[None]).logits[0], model(b[None]).logits[0]])
        leaky = model(packed).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky[9:], want[9:], atol=1e-3)  # without the mask, b would see a


def test_attention_mask_builder():
    assert build_attention_mask(5, 5, "cpu") is None
    m = build_attention_mask(2, 5, "cpu")[0, 0]  # two new queries behind three cached keys
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    seg = torch.tensor([[0, 0, 1, 1]])
    m = build_attention_mask(4, 4, "cpu", segment_ids=seg)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


def test_loss_ignores_masked_targets_and_matches_cross_entropy():
    """The fused head's loss and per-token log-probs equal log_softmax over the materialised logits."""
    model = _random_model(CONFIGS["untied_mha"])
    ids = torch.randint(0, 256, (2, 12))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    out = model(ids, targets=targets)
    assert out.logits is None  # never materialised for the loss
    logp = torch.log_softmax(model(ids).logits, -1)
    picked = logp[:, :-1].gather(-1, targets[:, :-1, None]).squeeze(-1)
    torch.testing.assert_close(out.loss, -picked.mean(), rtol=1e-6, atol=1e-6)
    logps = model(ids, targets=targets, token_logps=True).logps
    torch.testing.assert_close(logps[:, :-1], picked, rtol=1e-6, atol=1e-6)
    assert (logps[:, -1] == 0).all()


def test_too_long_input_is_a_clear_error():
    model = _random_model(CONFIGS["untied_mha"])
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_loading_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _random_model(CONFIGS["odd_tied"])
    save_model(model, tmp_path / "ck")
    state = load_file(str(tmp_path / "ck" / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.9.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="do not match the checksum"):  # an edited file is caught first
        load_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "checksums.json").unlink()  # a hand-edited checkpoint without its checksum list
    with pytest.raises(CheckpointError, match="missing keys: model.layers.1.mlp.up_proj.weight.*unexpected keys"):
        load_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_pretrained(tmp_path / "nothing")


def _varlen_twin(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """flash_attn_varlen_func's contract in plain PyTorch: each sequence of the flattened rows alone."""
    assert torch.equal(cu_q, cu_k) and causal and cu_q.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        out[a:b] = o.transpose(0, 1)
    return out


def test_packed_rows_take_the_varlen_path_with_the_masks_result(monkeypatch):
    """Where flash-attn runs, packed rows go to its varlen kernel over cumulative lengths from the segment
    ids, never a dense mask; here a PyTorch twin of that kernel stands in for it (no flash-attn on a CPU)."""
    import models.base as base
    import models.layers as layers
    import models.qwen2 as qwen2

    model = _random_model(CONFIGS["odd_tied"]).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 14))
    seg = torch.tensor([[0] * 4 + [1] * 6 + [2] * 4, [5] * 11 + [-1] * 3])
    with torch.no_grad():
        dense = model(ids, segment_ids=seg).logits
    calls = []
    monkeypatch.setattr(qwen2, "flash_attn_usable", lambda x: True)
    monkeypatch.setattr(layers, "_flash_attn_varlen_func", lambda *a, **k: calls.append(a[3]) or _varlen_twin(*a, **k))
    monkeypatch.setattr(base, "build_attention_mask", None)  # building a dense mask would be an error now
    with torch.no_grad():
        varlen = model(ids, segment_ids=seg).logits
    assert calls and calls[0].tolist() == [0, 4, 10, 14, 25, 28]
    torch.testing.assert_close(varlen, dense, rtol=1e-5, atol=1e-5)
