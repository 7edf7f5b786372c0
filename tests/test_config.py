import json

import pytest

from models import ConfigError, DenseConfig, config_from_dict, load_config, make_config, save_config
from models.config import PRESETS


def test_config_round_trips_through_json(tmp_path):
    cfg = make_config("dense", "tiny", vocab_size=1000, rope_theta=5e5, tie_word_embeddings=False)
    save_config(cfg, tmp_path / "c.json")
    back = load_config(tmp_path / "c.json")
    assert back == cfg
    assert json.loads((tmp_path / "c.json").read_text())["model_type"] == "dense"


@pytest.mark.parametrize("preset", sorted(PRESETS["dense"]))
def test_presets_are_valid(preset):
    cfg = make_config("dense", preset)
    assert cfg.hidden_size % cfg.num_attention_heads == 0


def test_parameter_count_formula_matches_the_model():
    from models import DenseLM

    for tie in (True, False):
        cfg = make_config("dense", "micro", vocab_size=300, tie_word_embeddings=tie)
        assert cfg.num_parameters() == DenseLM(cfg).num_parameters()


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"hidden_sizee": 8}, "unknown field(s) for a dense config: hidden_sizee"),
        ({"hidden_size": "big"}, "field 'hidden_size' must be int"),
        ({"hidden_size": 100, "num_attention_heads": 3}, "'hidden_size' (100) must be divisible"),
        ({"num_attention_heads": 4, "num_key_value_heads": 3}, "multiple of 'num_key_value_heads'"),
        ({"rope_theta": float("nan")}, "field 'rope_theta' must be a finite number"),
        ({"rms_norm_eps": float("inf")}, "field 'rms_norm_eps' must be a finite number"),
        ({"vocab_size": 0}, "field 'vocab_size' must be positive"),
        ({"tie_word_embeddings": 1}, "field 'tie_word_embeddings' must be bool"),
    ],
)
def test_bad_config_fields_are_named(tmp_path, change, needle):
    d = {**DenseConfig().to_dict(), **change}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value)
    assert str(path) in str(e.value)


def test_unknown_model_type_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="model_type"):
        config_from_dict({"model_type": "rnn"})
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")


def test_old_configs_with_a_kernel_backend_still_load(tmp_path):
    """The backend is a process setting now; files written before that carry it, and load."""
    for model_type in ("dense", "moe"):
        path = tmp_path / f"{model_type}.json"
        path.write_text(json.dumps({**make_config(model_type, "micro").to_dict(), "kernel_backend": "triton"}))
        cfg = load_config(path)
        assert "kernel_backend" not in cfg.to_dict() and cfg == make_config(model_type, "micro")
    text = {**make_config("dense", "micro").to_dict(), "kernel_backend": "torch"}
    vlm = config_from_dict({"model_type": "vlm", "text_config": text, "kernel_backend": "auto"})
    assert vlm.text_config == make_config("dense", "micro")


def test_vlm_holds_a_real_dense_config_and_round_trips(tmp_path):
    from models import VLMConfig

    cfg = make_config("vlm", "micro", text_config=make_config("dense", "micro", vocab_size=300).to_dict())
    assert isinstance(cfg.text_config, DenseConfig) and cfg.hidden_size == 64 and cfg.vocab_size == 300
    save_config(cfg, tmp_path / "v.json")
    back = load_config(tmp_path / "v.json")
    assert isinstance(back, VLMConfig) and back == cfg
    bad = {**cfg.to_dict(), "text_config": {**cfg.text_config.to_dict(), "hidden_size": 0}}
    with pytest.raises(ConfigError, match="text_config: field 'hidden_size' must be positive"):
        config_from_dict(bad)


def test_ints_for_float_fields_are_stored_as_floats():
    cfg = config_from_dict({"model_type": "dense", "rope_theta": 500000})
    assert cfg.rope_theta == 500000.0 and isinstance(cfg.rope_theta, float)


def test_preset_comments_state_the_computed_sizes():
    """Each preset's comment in models/config.py ("# dense small: 24.66M parameters ...") is its parameter
    count at the default vocabulary (the VLM's: vision tower and projector before the dense nano model)."""
    import re
    from pathlib import Path

    import torch

    from models import build_model

    source = (Path(__file__).resolve().parents[1] / "models" / "config.py").read_text()
    stated = {(f, n): float(x) for f, n, x in re.findall(r"# (dense|moe|vlm) (\w+): ([\d.]+)M parameters", source)}
    assert set(stated) == {(f, n) for f, presets in PRESETS.items() for n in presets}
    for (family, name), millions in stated.items():
        extra = {"text_config": make_config("dense", "nano")} if family == "vlm" else {}
        with torch.device("meta"):
            model = build_model(make_config(family, name, **extra))
        n = sum(p.numel() for k, p in model.named_parameters() if not k.startswith("language_model."))
        assert round(n / 1e6, 2) == millions, (family, name, n)
