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
        ({"kernel_backend": "cuda"}, "field 'kernel_backend'"),
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
