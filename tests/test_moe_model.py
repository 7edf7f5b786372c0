"""The MoE model (MLA + DeepSeekMoE): transformers DeepseekV3 parity, routing invariants, the balance
loss and bias update against hand-computed values, latent-cache decoding, MTP, strict round trips."""

import math

import pytest
import torch

from models import CheckpointError, MoELM, export_hf, import_hf, load_pretrained, make_config, save_model
from models.config import ConfigError
from models.generate import generate
from models.moe import DeepSeekMoE, MoEGate

CONFIGS = {
    # plain q_proj, one group, a prime number of experts, top-3
    "q_plain_g1": dict(
        vocab_size=211,
        q_lora_rank=None,
        n_group=1,
        topk_group=1,
        n_routed_experts=7,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        num_hidden_layers=3,
    ),
    # q compression, 4 groups of which 2 compete, scaling 2.5, no first dense layer, MTP, tied
    "q_lora_g4": dict(
        vocab_size=160,
        q_lora_rank=40,
        n_group=4,
        topk_group=2,
        n_routed_experts=12,
        num_experts_per_tok=3,
        routed_scaling_factor=2.5,
        first_k_dense_replace=0,
        n_shared_experts=2,
        num_mtp_layers=1,
        tie_word_embeddings=True,
    ),
    # YaRN rope scaling (softmax mscale correction), no top-k normalisation
    "yarn": dict(
        vocab_size=128,
        q_lora_rank=32,
        n_group=2,
        topk_group=1,
        norm_topk_prob=False,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    ),
}


def _random_model(overrides, seed=0) -> MoELM:
    torch.manual_seed(seed)
    model = MoELM(make_config("moe", "micro", initializer_range=0.1, **overrides)).eval()
    with torch.no_grad():  # non-trivial norms and a routing bias that changes choices
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        for block in model.moe_blocks():
            block.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    from models.checkpoint import copy_tokenizer_files

    d = tmp_path_factory.mktemp(request.param)
    model = _random_model(CONFIGS[request.param])
    save_model(model, d / "ours")
    copy_tokenizer_files(tokenizer_dir, d / "ours")
    export_hf(d / "ours", d / "hf")
    hf = AutoModelForCausalLM.from_pretrained(str(d / "hf"), attn_implementation="eager").eval()
    return model, hf, d


def test_logits_match_transformers_deepseek_v3(exported):
    model, hf, d = exported
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert hf.config.rope_interleave is True
    ids = torch.randint(0, model.config.vocab_size, (3, 37))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert theirs.abs().max() > 1.0  # large enough that a wrong route or rope would show
    assert (ours - theirs).abs().max().item() < 1e-5


def test_export_writes_per_expert_keys_and_imports_back(exported):
    model, _, d = exported
    from safetensors import safe_open

    with safe_open(str(d / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    layer = model.config.first_k_dense_replace
    assert f"model.layers.{layer}.mlp.experts.0.gate_proj.weight" in keys
    assert f"model.layers.{layer}.mlp.gate.e_score_correction_bias" in keys
    assert not any(k.endswith("gate_up_proj") for k in keys)
    back = import_hf(d / "hf")
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert type(load_pretrained(d / "hf")) is MoELM


def test_mtp_layer_n_round_trips_when_the_checkpoint_carries_it(exported):
    model, _, d = exported
    back = import_hf(d / "hf")
    assert (back.mtp is not None) == bool(model.config.num_mtp_layers)
    assert back.config.num_mtp_layers == model.config.num_mtp_layers


# Written by transformers itself: DeepseekV3Config's default num_nextn_predict_layers is 1, but its model has
# no MTP module and writes no MTP weights. Odd sizes, three expert groups of which two compete.
HF_WRITTEN = dict(
    vocab_size=1031,
    hidden_size=72,
    intermediate_size=100,
    moe_intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=3,
    num_key_value_heads=3,
    q_lora_rank=40,
    kv_lora_rank=24,
    qk_nope_head_dim=12,
    qk_rope_head_dim=8,
    v_head_dim=10,
    n_routed_experts=12,
    n_group=3,
    topk_group=2,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    n_shared_experts=1,
    routed_scaling_factor=1.5,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def transformers_written(tmp_path_factory, tokenizer_dir):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from models.checkpoint import copy_tokenizer_files

    d = tmp_path_factory.mktemp("hf_written")
    torch.manual_seed(0)
    config = DeepseekV3Config(**HF_WRITTEN)
    assert config.num_mtp_layers == 1  # what transformers writes by default
    hf = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.05)
    hf.save_pretrained(d)
    copy_tokenizer_files(tokenizer_dir, d)
    return hf, d


def test_a_deepseek_v3_directory_written_by_transformers_loads_without_mtp(transformers_written, caplog):
    hf, d = transformers_written
    with caplog.at_level("WARNING"):
        model = load_pretrained(d)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "MTP" in notes[0] and str(d) in notes[0] and "\n" not in notes[0]
    assert model.mtp is None and model.config.num_mtp_layers == 0
    assert (model.config.n_group, model.config.topk_group, model.config.vocab_size) == (3, 2, 1031)
    ids = torch.randint(0, 1031, (2, 29))
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() < 1e-5


def test_transformers_written_deepseek_goes_through_export_and_sft_init(transformers_written, synthetic_dir, tmp_path):
    from train.sft import main as sft_main

    _, d = transformers_written
    out = export_hf(d, tmp_path / "again")
    assert load_pretrained(out).mtp is None
    summary = sft_main(
        [
            "--init",
            str(d),
            "--data",
            str(synthetic_dir / "sft_train.jsonl"),
            "--out",
            str(tmp_path / "sft"),
            "--seq-len",
            "64",
            "--batch-size",
            "2",
            "--max-steps",
            "1",
            "--eval-every",
            "0",
            "--no-progress",
        ]
    )
    assert summary["end_step"] == 1


def test_greedy_generation_matches_transformers(exported):
    model, hf, _ = exported
    prompt = torch.randint(0, model.config.vocab_size, (1, 9))
    ours = generate(model, [prompt[0].tolist()], max_new_tokens=12)[0]
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 9:].tolist()
    assert ours == theirs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_absorbed_latent_cache_decoding_matches_full_attention(name):
    model = _random_model(CONFIGS[name])
    ids = torch.randint(0, model.config.vocab_size, (2, 23))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_kv_cache(2, 32)
        steps = [model(ids[:, :10], kv_cache=cache).logits]
        steps += [model(ids[:, t : t + 1], kv_cache=cache).logits for t in range(10, 23)]
    assert (torch.cat(steps, 1) - full).abs().max().item() < 1e-4
    c = model.config
    assert cache.c_kv[0].shape == (2, 32, c.kv_lora_rank) and cache.k_rope[0].shape == (2, 32, c.qk_rope_head_dim)
    per_layer = c.kv_lora_rank + c.qk_rope_head_dim
    assert model.cache_bytes_per_token(torch.bfloat16) == c.num_hidden_layers * per_layer * 2


def _gate(**overrides) -> MoEGate:
    torch.manual_seed(1)
    gate = MoEGate(make_config("moe", "micro", **overrides))
    torch.nn.init.normal_(gate.weight, std=0.5)
    return gate


@pytest.mark.parametrize(
    "overrides",
    [
        dict(n_routed_experts=7, num_experts_per_tok=1),
        dict(n_routed_experts=12, n_group=4, topk_group=2, num_experts_per_tok=4, routed_scaling_factor=2.5),
        dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False),
    ],
)
def test_routing_invariants(overrides):
    gate = _gate(**overrides)
    c = make_config("moe", "micro", **overrides)
    gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(300, c.hidden_size)
    idx, weight, scores = gate(x)
    k, e = c.num_experts_per_tok, c.n_routed_experts
    assert idx.shape == (300, k) and weight.dtype == torch.float32
    assert all(len(set(row)) == k for row in idx.tolist())  # exactly k distinct experts
    per_group = e // c.n_group
    groups = idx // per_group
    assert all(len(set(row)) <= c.topk_group for row in groups.tolist())  # the group limit
    unbiased = scores.gather(1, idx)  # weights come from the unbiased scores
    expected = unbiased / unbiased.sum(-1, keepdim=True) if c.norm_topk_prob else unbiased
    torch.testing.assert_close(weight, expected * c.routed_scaling_factor)
    # the chosen experts are the best by score + bias within the kept groups (here: with one group, globally)
    if c.n_group == 1:
        best = (scores + gate.e_score_correction_bias).topk(k, dim=-1).indices
        assert torch.equal(idx.sort(-1).values, best.sort(-1).values)


def test_bias_moves_only_the_choice_and_towards_balance():
    gate = _gate(n_routed_experts=8, num_experts_per_tok=2)
    x = torch.randn(64, gate.weight.shape[1])
    _, _, scores = gate(x)
    gate.e_score_correction_bias[3] = 10.0  # expert 3 is now always chosen ...
    idx, weight, scores2 = gate(x)
    assert (idx == 3).any(-1).all()
    torch.testing.assert_close(scores, scores2)  # ... but the scores (and so the weights) ignore the bias
    torch.testing.assert_close(weight, (lambda u: u / u.sum(-1, keepdim=True))(scores.gather(1, idx)))
    # the update: overloaded experts go down by gamma, underloaded go up, by the sign only
    block = DeepSeekMoE(make_config("moe", "micro", n_routed_experts=4, num_experts_per_tok=1, bias_update_speed=0.01))
    block.load = torch.tensor([10.0, 0.0, 5.0, 1.0])  # mean 4
    ratio = block.update_bias(0.01, reduce=lambda t: t * 2)  # two ranks with the same counts
    torch.testing.assert_close(block.gate.e_score_correction_bias, torch.tensor([-0.01, 0.01, -0.01, 0.01]))
    assert ratio == pytest.approx(10 / 4) and block.load is None


def test_sequence_balance_loss_against_hand_computed_value():
    block = DeepSeekMoE(make_config("moe", "micro", n_routed_experts=4, num_experts_per_tok=2))
    idx = torch.tensor([[[0, 1], [0, 2], [0, 1]]])  # one row, T=3, K=2
    scores = torch.tensor([[[0.9, 0.5, 0.1, 0.1], [0.8, 0.1, 0.6, 0.1], [0.7, 0.6, 0.2, 0.1]]])
    # f_i = E/(K T) * picks_i = 4/6 * [3, 2, 1, 0]; P_i = mean_t s_it / sum_j s_jt
    f = [4 / 6 * n for n in (3, 2, 1, 0)]
    rows = [[v / sum(r) for v in r] for r in scores[0].tolist()]
    p = [sum(r[i] for r in rows) / 3 for i in range(4)]
    expected = sum(fi * pi for fi, pi in zip(f, p))
    assert block.balance_statistic(idx, scores).item() == pytest.approx(expected, rel=1e-6)
    # perfectly uniform routing gives exactly 1
    uni_idx = torch.tensor([[[0, 1], [2, 3]]])
    assert block.balance_statistic(uni_idx, torch.full((1, 2, 4), 0.5)).item() == pytest.approx(1.0)


def test_training_loss_adds_balance_and_mtp_terms():
    model = _random_model(CONFIGS["q_lora_g4"]).train()
    c = model.config
    ids = torch.randint(0, c.vocab_size, (2, 16))
    out = model(ids, targets=torch.roll(ids, -1, 1))
    aux = out.aux
    expected = aux["lm_loss"] + c.aux_loss_alpha * aux["balance_loss"] + c.mtp_loss_weight * aux["mtp_loss"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # the MTP module and every expert learn
    # eval: the plain LM loss
    model.eval()
    with torch.no_grad():
        ev = model(ids, targets=torch.roll(ids, -1, 1))
    assert ev.loss.item() == pytest.approx(ev.aux["lm_loss"].item())


def test_load_counts_and_after_step_stats():
    model = _random_model(CONFIGS["q_plain_g1"]).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    model(ids, targets=ids).loss.backward()
    counts = [b.load.sum().item() for b in model.moe_blocks()]
    assert counts == [2 * 10 * model.config.num_experts_per_tok] * len(counts)
    before = [b.gate.e_score_correction_bias.clone() for b in model.moe_blocks()]
    stats = model.after_optimizer_step(lambda t: t)
    assert stats["load_max_mean"] >= 1.0
    after = [b.gate.e_score_correction_bias for b in model.moe_blocks()]
    gamma = model.config.bias_update_speed
    for a, b in zip(after, before):  # every expert moved by -gamma, 0 (exactly at the mean) or +gamma
        steps = (a - b) / gamma
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.round().abs().max() == 1
    with torch.no_grad():  # evaluation does not count
        model(ids)
    assert all(b.load is None for b in model.moe_blocks())


def test_bias_stays_fp32_when_the_model_is_cast():
    model = _random_model(CONFIGS["q_plain_g1"]).to(torch.bfloat16)
    assert all(b.gate.e_score_correction_bias.dtype == torch.float32 for b in model.moe_blocks())
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_checkpoint_round_trip_is_strict(tmp_path):
    model = _random_model(CONFIGS["q_lora_g4"])
    save_model(model, tmp_path / "m")
    back = load_pretrained(tmp_path / "m")
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "m" / "model.safetensors"))
    state.pop("model.layers.1.mlp.gate.e_score_correction_bias")
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    (tmp_path / "m" / "checksums.json").unlink()  # hand-edited: without the list, the strict key check speaks
    with pytest.raises(CheckpointError, match="e_score_correction_bias"):
        load_pretrained(tmp_path / "m")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="n_group"):
        make_config("moe", "micro", n_routed_experts=9, n_group=2)
    with pytest.raises(ConfigError, match="topk_group"):
        make_config("moe", "micro", n_group=2, topk_group=3)
    with pytest.raises(ConfigError, match="num_experts_per_tok"):
        make_config("moe", "micro", n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3)
    with pytest.raises(ConfigError, match="rope_scaling"):
        make_config("moe", "micro", rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(ConfigError, match="q_lora_rank"):
        make_config("moe", "micro", q_lora_rank="big")


def test_latent_cache_is_smaller_than_gqa_cache():
    moe = MoELM(make_config("moe", "nano"))
    from models import DenseLM

    dense = DenseLM(make_config("dense", "nano"))
    c = dense.config
    gqa = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 2
    assert moe.cache_bytes_per_token() < gqa
    assert math.isclose(moe.cache_bytes_per_token(), 4 * (64 + 16) * 2)


def test_packed_rows_use_sequence_starts_not_a_dense_mask(monkeypatch):
    """A packed row reaches MLA as sequence starts (the kernel's packed mode), with the segment mask's result."""
    import kernels
    from kernels.mla_attention import sequence_mask

    model = _random_model(CONFIGS["q_lora_g4"]).eval()
    seg = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [-1] * 7])
    starts = kernels.seq_start_from_segments(seg)
    assert starts.tolist()[0] == [0] * 5 + [5] * 7 + [12] * 4 and starts.dtype == torch.int32
    same = (seg[:, :, None] == seg[:, None, :])[:, None]
    assert torch.equal(sequence_mask(starts), same & torch.ones(16, 16, dtype=torch.bool).tril())
    seen = []
    real = kernels.mla_attention
    monkeypatch.setattr(kernels, "mla_attention", lambda *a, **k: seen.append((a[6:], k)) or real(*a, **k))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        packed = model(ids, segment_ids=seg).logits
    assert seen and all(k.get("seq_start") is not None and not a for a, k in seen)
    monkeypatch.undo()
    for b in range(2):  # each document alone gives the same logits
        for s in seg[b].unique():
            cols = (seg[b] == s).nonzero().squeeze(1)
            with torch.no_grad():
                alone = model(ids[b : b + 1, cols]).logits[0]
            torch.testing.assert_close(packed[b, cols], alone, rtol=1e-4, atol=1e-5)
