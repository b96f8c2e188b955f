"""Typed configs: every shipped file loads; overrides are typed; unknown keys are named."""
import pytest

from internvl_jax.config import CONFIGS_DIR, ConfigError, apply_overrides, load_config

ALL_CONFIGS = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_loads(name):
    config = load_config(name)
    assert config.model.llm.vocab_size > 0


def test_recipe_names_cover_models_and_stages():
    for model in ("internvl_chat_v1_5", "mini_internvl_chat_2b_v1_5", "mini_internvl_chat_4b_v1_5"):
        for stage in ("pretrain", "finetune", "finetune_2nd", "finetune_lora"):
            assert f"{model}_{stage}" in ALL_CONFIGS


def test_official_recipe_values():
    stage1_4b = load_config("mini_internvl_chat_4b_v1_5_pretrain")
    assert stage1_4b.train.trainable == ("mlp1",) and stage1_4b.train.learning_rate == 2e-4
    stage2_26b = load_config("internvl_chat_v1_5_finetune")
    assert stage2_26b.train.max_seq_length == 4096 and stage2_26b.model.vision.drop_path_rate == 0.4
    assert stage2_26b.train.group_by_length
    lora = load_config("mini_internvl_chat_2b_v1_5_finetune_lora")
    assert (lora.model.lora.rank, lora.model.lora.alpha, lora.model.lora.dropout) == (16, 32.0, 0.05)
    assert lora.train.trainable == ("language_model",)


def test_typed_overrides():
    config = load_config("tiny", ["model.llm.num_layers=3", "train.learning_rate=3e-4",
                                  "model.scan_layers=false", "model.lora.targets=qkv,o", "mesh.fsdp=2"])
    assert config.model.llm.num_layers == 3 and isinstance(config.model.llm.num_layers, int)
    assert config.train.learning_rate == 3e-4
    assert config.model.scan_layers is False
    assert config.model.lora.targets == ("qkv", "o")
    assert config.mesh.fsdp == 2


@pytest.mark.parametrize("override, fragment", [
    ("model.llm.num_layerz=3", "model.llm.num_layerz"),
    ("model.llm.num_layers=three", "model.llm.num_layers"),
    ("model.scan_layers=maybe", "model.scan_layers"),
    ("model.llm=3", "model.llm"),
    ("nonsense", "key=value"),
])
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        apply_overrides(load_config("tiny"), [override])


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="no config 'no_such_recipe'"):
        load_config("no_such_recipe")
