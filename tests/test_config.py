import pytest

from alignlab.platform import config as C


def test_defaults_follow_the_papers():
    cfg = C.load_config()
    assert cfg.objectives.mlm_prob == 0.15 and cfg.objectives.mcr_prob == 0.25
    assert (cfg.data.max_text_len, cfg.data.max_phrases, cfg.data.max_regions, cfg.data.max_tags) == (35, 5, 50, 20)
    assert cfg.objectives.negatives == "global"


def test_preset_and_overrides_are_typed():
    cfg = C.load_config("dual_encoder_demo", ["optim.lr=3e-4", "model.image.kind=regions", "data.crop_scale=[0.5, 1]",
                                              "objectives.weights.itc=0.5", "scaling.use_gpu=false"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.model.image.kind == "regions"
    assert cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.objectives.weights == {"itc": 0.5}
    assert cfg.model.hidden_size == 128  # from the preset


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(C.ConfigError) as e:
        C.load_config(overrides=["optim.learning_rate=1e-4"])
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "lr" in msg and "valid keys" in msg


def test_typo_suggestion():
    with pytest.raises(C.ConfigError, match="did you mean 'max_steps'"):
        C.load_config(overrides=["optim.max_step=10"])


def test_wrong_type_names_key():
    with pytest.raises(C.ConfigError, match="'optim.max_steps' = 'ten' must be an int"):
        C.load_config(overrides=["optim.max_steps=ten"])
    with pytest.raises(C.ConfigError, match="'scaling.use_gpu'"):
        C.load_config(overrides=["scaling.use_gpu=3"])


def test_invalid_choice_lists_valid_choices():
    with pytest.raises(C.ConfigError) as e:
        C.load_config(overrides=["precision.precision=fp8"])
    assert "'fp16'" in str(e.value) and "'bf16'" in str(e.value) and "'fp8'" in str(e.value)
    with pytest.raises(C.ConfigError, match="'dual_encoder'"):
        C.load_config(overrides=["model.architecture=clip_xl"])


def test_cross_field_checks():
    with pytest.raises(C.ConfigError, match="needs CUDA"):
        C.load_config(overrides=["precision.precision=fp16"])
    with pytest.raises(C.ConfigError, match="divide evenly"):
        C.load_config(overrides=["data.batch_size=63", "scaling.num_workers=2"])
    with pytest.raises(C.ConfigError, match="valid objectives: itc"):
        C.load_config(overrides=["objectives.weights.mlm=1.0"])


def test_unknown_preset_lists_presets():
    with pytest.raises(C.ConfigError, match="dual_encoder_demo"):
        C.load_config("no_such_preset")


def test_yaml_base_inheritance_and_round_trip(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: dual_encoder_demo\noptim:\n  max_steps: 7\n")
    cfg = C.load_config(str(child))
    assert cfg.optim.max_steps == 7 and cfg.model.hidden_size == 128
    again = C.from_dict(__import__("yaml").safe_load(C.dump_yaml(cfg)))
    assert again == cfg
    flat = C.flatten(C.to_dict(cfg))
    assert flat["optim.max_steps"] == 7 and flat["model.image.kind"] == "vit"


@pytest.mark.parametrize("preset", sorted(p.stem for p in C.PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads_and_passes_its_checks(preset):
    cfg = C.load_config(preset)
    assert cfg.optim.max_steps > 0
    if preset.endswith("_cpu"):
        # The CPU budget presets keep their base's data and initialisation, on a CPU precision.
        base = C.load_config(preset.removesuffix("_cpu"))
        assert (cfg.data.shards, cfg.model.text_init, cfg.model.architecture) == \
            (base.data.shards, base.model.text_init, base.model.architecture)
        assert cfg.precision.precision in ("auto", "bf16", "fp32") and not cfg.scaling.use_gpu
