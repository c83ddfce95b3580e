"""Strict architecture configs: errors name the key, the type or the reason."""

import pytest
import yaml
from conftest import ODD_ARCH

from mlx_clip.config import load_config
from mlx_clip.models.config import ModelConfig, model_config
from mlx_clip.schema import ConfigError


def test_name_dict_and_path_resolve_the_same(tmp_path):
    by_name = model_config("tiny")
    assert ModelConfig.from_dict(vars(by_name).copy()) == by_name
    path = tmp_path / "arch.yaml"
    path.write_text(yaml.safe_dump(vars(by_name)))
    assert model_config(str(path)) == by_name


def test_unknown_key_names_key_and_nearest():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'model.vision_layer'.*did you mean 'model.vision_layers'"
    ):
        ModelConfig.from_dict(dict(ODD_ARCH, vision_layer=3))


def test_wrong_type_names_field_and_type():
    with pytest.raises(ConfigError, match=r"model.vision_width: expected int, got str"):
        ModelConfig.from_dict(dict(ODD_ARCH, vision_width="96"))
    with pytest.raises(ConfigError, match=r"model.layer_norm_eps: expected float"):
        ModelConfig.from_dict(dict(ODD_ARCH, layer_norm_eps=True))


def test_ints_are_accepted_for_floats():
    assert ModelConfig.from_dict(dict(ODD_ARCH, mlp_ratio=4)).mlp_ratio == 4.0


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(image_size=50), "not divisible by model.patch_size"),
        (dict(vision_heads=5), "vision_width=96 is not divisible by model.vision_heads=5"),
        (dict(activation="relu"), "activation must be 'quick_gelu', 'gelu' or 'gelu_tanh'"),
        (dict(text_layers=0), "text_layers must be positive"),
    ],
)
def test_impossible_values_say_why(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(dict(ODD_ARCH, **change))


def test_unknown_architecture_suggests():
    with pytest.raises(ConfigError, match=r"unknown architecture 'vit_b23'.*did you mean 'vit_b32'"):
        model_config("vit_b23")


def test_defaults_are_vit_b32():
    assert ModelConfig() == model_config("vit_b32")


def _sections():
    import dataclasses

    from mlx_clip.config import Config

    for section in dataclasses.fields(Config):
        if section.name == "model":
            continue
        for f in dataclasses.fields(section.default_factory()):
            yield f"{section.name}.{f.name}", f.type


@pytest.mark.parametrize("key,tp", list(_sections()))
def test_every_run_key_rejects_a_wrong_type_by_name(key, tp):
    from mlx_clip.config import load_config

    wrong = [1, 2] if str(tp) == "int | str" else 123 if "str" in str(tp) else "not-a-value"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [(key, wrong)])


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("data.batch_size", "1", "at least 2 pairs"),
        ("data.val_ratio", "1.5", "val_ratio"),
        ("data.crop_scale", "[0.9, 0.2]", "crop_scale"),
        ("data.builtin_split", "triple", "builtin_split"),
        ("data.format", "xml", "data.format"),
        ("data.num_workers", "0", "num_workers"),
        ("data.validate", "maybe", "data.validate"),
        ("data.max_bad_fraction", "2", "max_bad_fraction"),
        ("data.max_image_pixels", "0", "max_image_pixels"),
        ("loss.type", "triplet", "loss.type"),
        ("loss.label_smoothing", "1.0", "label_smoothing"),
        ("optim.lr", "0", "optim.lr"),
        ("optim.min_lr", "1", "min_lr"),
        ("optim.beta2", "1.0", "beta"),
        ("optim.eps", "0", "eps"),
        ("optim.image_lr", "-1", "image_lr"),
        ("optim.lock_image_unlocked_layers", "99", "lock_image_unlocked_layers"),
        ("train.steps", "0", "train.steps"),
        ("train.precision", "float8", "precision"),
        ("train.keep_last", "0", "keep_last"),
        ("train.max_bad_steps", "0", "max_bad_steps"),
        ("tokenizer.kind", "openai", "49408"),
        ("data.builtin_paraphrases", "1", "data.builtin_paraphrases"),
        ("data.builtin_paraphrases", "11", "data.builtin_paraphrases"),
        ("data.sampler", "nouns", "data.sampler"),
        ("loss.strategy", "easy", "loss.strategy"),
        ("loss.ratio", "0", "loss.ratio"),
        ("loss.weight", "-1", "loss.weight"),
        ("loss.margin", "3", "loss.margin"),
        ("loss.scales", "[]", "loss.scales"),
        ("loss.scales", "[1.0, -2.0]", "loss.scales"),
        ("loss.scale_weights", "[1.0]", "loss.scale_weights"),
        ("loss.scale_weights", "[0, 0, 0]", "loss.scale_weights"),
    ],
)
def test_out_of_range_values_name_the_field(key, value, message):
    from mlx_clip.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [(key, value)])


def test_a_fixed_set_of_values_is_named_in_the_error():
    from mlx_clip.config import load_config

    with pytest.raises(ConfigError, match=r"data\.sampler must be 'random' or 'hard_negative', got 'nouns'"):
        load_config(None, [("data.sampler", "nouns")])
    with pytest.raises(ConfigError, match=r"schedule must be 'learnable', .* got 'linear'"):
        load_config(None, [("loss.temperature.schedule", "linear")])
    with pytest.raises(ConfigError, match=r"train\.streams must be an integer or 'auto', got 'fast'"):
        load_config(None, [("train.streams", "fast")])
    with pytest.raises(ConfigError, match=r"data\.format must be .*, got 5"):  # a non-string, too
        load_config(None, [("data.format", "5")])
    cfg = load_config(None, [("data.batch_size", "auto"), ("train.streams", "3")])
    assert (cfg.data.batch_size, cfg.train.streams) == ("auto", 3)


def test_the_model_section_is_checked_like_the_others():
    from mlx_clip.config import load_config

    with pytest.raises(
        ConfigError, match=r"unknown config key 'model.vision_layer'.*did you mean 'model.vision_layers'"
    ):
        load_config(None, [("model.vision_layer", "3")])
    with pytest.raises(ConfigError, match=r"model.vision_width: expected int \| None, got str"):
        load_config(None, [("model.vision_width", "'96'")])
    with pytest.raises(ConfigError, match=r"model.image_size=50 is not divisible by model.patch_size"):
        load_config(None, [("model.image_size", "50")])
    m = load_config(None, [("model.arch", "vit_b32"), ("model.mlp_ratio", "2")]).model_config()
    assert m == ModelConfig(mlp_ratio=2.0)  # the architecture's fields, one overridden


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [("loss.type", "siglip"), ("model.arch", "vit_b32"), ("model.init_from", "runs/a")],
        [("model.arch", "custom"), ("model.vision_layers", "3"), ("model.activation", "gelu")],
    ],
    ids=["default", "siglip-init_from", "custom"],
)
def test_resolved_config_yaml_lists_every_field_and_loads_back(tmp_path, overrides):
    import dataclasses

    from mlx_clip.config import config_to_yaml, load_config

    cfg = load_config(None, overrides)
    text = config_to_yaml(cfg)
    model = yaml.safe_load(text)["model"]
    named = ["arch", "init_from"] if cfg.model.init_from else ["arch"]
    assert list(model) == named + [f.name for f in dataclasses.fields(ModelConfig)]
    (tmp_path / "config.yaml").write_text(text)
    back = load_config(tmp_path / "config.yaml")
    assert config_to_yaml(back) == text
    assert back.model_config() == cfg.model_config()
    assert (back.model.arch, back.model.init_from) == (cfg.model.arch, cfg.model.init_from)
    assert dataclasses.replace(back, model=cfg.model) == cfg  # every other section


def test_yaml_is_read_safely_and_missing_files_are_named(tmp_path):
    from mlx_clip.config import load_config

    evil = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    evil.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="evil.yaml: invalid YAML"):
        load_config(evil)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_label_smoothing_is_refused_for_siglip():
    from mlx_clip.config import load_config

    with pytest.raises(ConfigError, match="label_smoothing.*siglip"):
        load_config(None, [("loss.type", "siglip"), ("loss.label_smoothing", "0.1")])


def test_siglip_sets_its_init_unless_the_model_section_does():
    import math

    from mlx_clip.config import load_config

    m = load_config(None, [("loss.type", "siglip")]).model_config()
    assert m.init_logit_scale == pytest.approx(math.log(10)) and m.init_logit_bias == -10.0
    m = load_config(None, [("loss.type", "siglip"), ("model.init_logit_bias", "-5")]).model_config()
    assert m.init_logit_bias == -5.0
    assert load_config(None, []).model_config().init_logit_bias is None


def test_off_on_yes_no_stay_strings_in_files_and_overrides(tmp_path):
    # YAML 1.2 booleans: `validate: off` is the string the Literal allows, not False (PyYAML's 1.1)
    (tmp_path / "c.yaml").write_text("data:\n  validate: off\n  augment: true\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.validate == "off" and cfg.data.augment is True
    assert load_config(None, [("data.validate", "off")]).data.validate == "off"
    assert load_config(None, [("data.augment", "False")]).data.augment is False
    with pytest.raises(ConfigError, match=r"data.augment"):
        load_config(None, [("data.augment", "yes")])  # a bool is written true / false
