"""Issue 13, finding 2 and the config items of finding 6: a NaN model must not score 100% or become
"best", the step guard keeps the weights finite, and configs (run, architecture, HF config.json)
refuse NaN, inf and absurd sizes by name before anything is allocated."""

import dataclasses
import json
import math
import re
import time

import mlx.core as mx
import numpy as np
import pytest
from conftest import ODD_ARCH, train_run
from dist_grad_worker import ARCH, batch
from mlx.utils import tree_flatten

from mlx_clip.config import Config, load_config
from mlx_clip.evaluation.metrics import retrieval_metrics, zero_shot_accuracy
from mlx_clip.models.config import ModelConfig
from mlx_clip.schema import ConfigError
from mlx_clip.training.state import RunState

# ---------------------------------------------------------------------------
# Metrics: ties and non-finite scores are misses; non-finite features make the metric NaN


def test_zero_shot_ties_are_misses_and_a_clear_winner_is_a_hit():
    classifier = np.eye(3)
    labels = np.array([0, 1, 2])
    constant = np.ones((3, 3))  # every class scores the same for every image: a constant model
    acc = zero_shot_accuracy(constant, classifier, labels, topk=(1, 2, 3))
    assert acc == {"zeroshot_top1": 0.0, "zeroshot_top2": 0.0, "zeroshot_top3": 1.0}  # 3 of 3 is no test
    clear = np.eye(3) + 0.1  # each image closest to its own class
    assert zero_shot_accuracy(clear, classifier, labels, topk=(1,)) == {"zeroshot_top1": 1.0}
    # A tie for first with one rival: not strictly above it, so no top-1 hit; top-2 is.
    half = np.array([[1.0, 1.0, 0.0]])
    assert zero_shot_accuracy(half, classifier, np.array([0]), topk=(1, 2)) == {
        "zeroshot_top1": 0.0,
        "zeroshot_top2": 1.0,
    }


def test_zero_shot_non_finite_features_give_nan_and_nan_scores_are_misses():
    classifier, labels = np.eye(3), np.array([0, 1, 2])
    for bad in (np.nan, np.inf):
        features = np.eye(3)
        features[1, 1] = bad
        acc = zero_shot_accuracy(features, classifier, labels)
        assert list(acc) == ["zeroshot_top1"] and math.isnan(acc["zeroshot_top1"])
    # Finite features whose scores are NaN (a zero embedding cannot be normalised): that image misses.
    features = np.eye(3)
    features[2] = 0.0
    with np.errstate(invalid="ignore"):
        acc = zero_shot_accuracy(features, classifier, labels, topk=(1, 3))
    assert acc == {"zeroshot_top1": pytest.approx(2 / 3), "zeroshot_top3": pytest.approx(2 / 3)}


def test_retrieval_ties_are_misses_and_non_finite_features_give_nan():
    owner = np.arange(4)
    same = np.ones((4, 2))  # every image and caption embeds alike
    m = retrieval_metrics(same, same, owner)
    assert m["i2t_R@1"] == 0.0 and m["t2i_R@1"] == 0.0
    assert m["i2t_mean_rank"] == 4.0 and m["t2i_mean_rank"] == 4.0  # last of 4: ties rank below
    clear = np.eye(4)
    m = retrieval_metrics(clear, clear, owner)
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0 and m["i2t_mean_rank"] == 1.0
    nan_text = clear.copy()
    nan_text[0, 0] = np.nan
    m = retrieval_metrics(clear, nan_text, owner)
    assert m["retrieval_images"] == 4
    assert all(math.isnan(v) for k, v in m.items() if k != "retrieval_images")
    # One caption embedded as zeros (finite features, NaN scores): as a query and as its image's
    # answer it misses; as a rival of the other images it is not beaten, so they rank 2nd.
    zero_text = clear.copy()
    zero_text[3] = 0.0
    with np.errstate(invalid="ignore"):
        m = retrieval_metrics(clear, zero_text, owner)
    assert m["t2i_R@1"] == 0.75 and m["i2t_R@1"] == 0.0 and m["i2t_R@5"] == 0.75
    assert m["t2i_mean_rank"] == pytest.approx((1 + 1 + 1 + 4) / 4)  # the NaN caption ranks last


def test_a_caption_reading_like_an_images_own_is_the_same_answer_not_a_tie():
    """Images 0 and 1 both have the caption "a red circle." (identical text, identical features):
    image 0 finding image 1's copy first is a hit; a tie with a different text stays a miss."""
    images = np.eye(3)
    captions = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
    owner = np.arange(3)
    texts = ["a red circle.", "a red circle.", "a blue square."]
    assert retrieval_metrics(images, captions, owner)["i2t_R@1"] == pytest.approx(1 / 3)
    # image 0 now finds its text first (a hit); image 1 (all scores 0) still ties: a miss
    assert retrieval_metrics(images, captions, owner, texts)["i2t_R@1"] == pytest.approx(2 / 3)
    # image 1 embeds like image 0: its own caption ties with image 0's identical text -> a hit now
    images[1] = images[0]
    plain = retrieval_metrics(images, captions, owner)
    assert plain["i2t_R@1"] == pytest.approx(1 / 3)  # both tie: misses without the texts
    m = retrieval_metrics(images, captions, owner, texts)
    assert m["i2t_R@1"] == 1.0 and m["i2t_mean_rank"] == 1.0
    assert m["t2i_R@1"] == plain["t2i_R@1"]  # text->image is unchanged by the texts
    texts[1] = "a red circle, small."  # a different text with the same score is a rival again
    assert retrieval_metrics(images, captions, owner, texts)["i2t_R@1"] == pytest.approx(1 / 3)


def test_a_nan_metric_never_becomes_best():
    state = RunState()
    assert not state.observe("acc", {"acc": math.nan}, "step_1")
    assert state.best["checkpoint"] is None
    assert state.observe("acc", {"acc": 0.3}, "step_2")
    for value in (math.nan, math.inf):
        assert not state.observe("acc", {"acc": value}, "step_3")
    assert state.best == {"name": "acc", "value": 0.3, "checkpoint": "step_2"}


def test_a_run_with_non_finite_embeddings_reports_nan_not_100_percent(tmp_path, monkeypatch, capsys):
    """The issue's NaN run, end to end: its evaluation is NaN, not a perfect score, and no
    checkpoint is recorded as best."""
    from mlx_clip.models.model import CLIP

    encode_image = CLIP.encode_image
    monkeypatch.setattr(CLIP, "encode_image", lambda self, *a, **k: encode_image(self, *a, **k) * mx.nan)
    out, summary = train_run(tmp_path, "nan", "--steps", "2", "--eval.every", "0")
    assert math.isnan(summary["zeroshot_top1"]) and math.isnan(summary["i2t_R@1"])
    assert summary["skipped_steps"] == 2  # the loss was NaN too: both updates were refused
    state = json.loads((out / "checkpoints" / "latest" / "state.json").read_text())
    assert state["best"]["checkpoint"] is None
    assert (
        "zero-shot top-1 on held-out images: NaN (the model's embeddings are not finite)"
        in capsys.readouterr().out
    )


# ---------------------------------------------------------------------------
# The step guard: an update that would make a weight non-finite is rejected


def _arrays(tree):
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def _one_step(cfg):
    from mlx_clip.training.build import build_training

    training = build_training(cfg)
    before = _arrays(training.model.parameters()), _arrays(training.optimizer.state)
    images, tokens = batch(cfg)
    loss, grad_norm = training.step(mx.array(images), mx.array(tokens))
    mx.eval(training.state, loss, grad_norm)
    after = _arrays(training.model.parameters()), _arrays(training.optimizer.state)
    return before, after, loss.item(), grad_norm.item()


@pytest.mark.parametrize("accum_steps", ["1", "2"])  # the plain and the gradient-caching step
def test_an_update_that_would_make_a_weight_non_finite_keeps_weights_and_optimizer_state(accum_steps):
    cfg = load_config(None, [*ARCH, ("optim.warmup_steps", "0"), ("optim.accum_steps", accum_steps)])
    (w0, o0), (w1, o1), loss, norm = _one_step(cfg)
    assert math.isfinite(loss) and math.isfinite(norm)
    assert any(not np.array_equal(w0[k], w1[k]) for k in w0)  # a normal step moves the weights
    # A learning rate beyond float32 for the image tower only (config validation would refuse it,
    # so the config is edited past it): its weights would turn inf, so the whole update is refused.
    huge = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, image_lr=1e39))
    (w0, o0), (w1, o1), loss, norm = _one_step(huge)
    assert math.isfinite(loss) and math.isnan(norm)  # the loop counts a NaN norm as a bad step
    assert w0.keys() == w1.keys() and all(np.array_equal(w0[k], w1[k]) for k in w0)
    assert o0.keys() == o1.keys() and all(np.array_equal(o0[k], o1[k]) for k in o0)


def test_the_loop_counts_rejected_updates_and_stops_after_max_bad_steps(tmp_path, monkeypatch):
    from mlx_clip.training import build

    real = build.build_optimizer
    monkeypatch.setattr(
        build, "build_optimizer", lambda o, *a, **k: real(dataclasses.replace(o, lr=1e39), *a, **k)
    )
    with pytest.raises(
        SystemExit, match="2 consecutive steps with a non-finite loss, gradient or updated weights"
    ):
        train_run(tmp_path, "huge", "--steps", "4", "--eval.every", "0", "--train.max_bad_steps", "2")


def test_the_issue_command_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"optim\.lr must be in \(0, 10\].*1e\+30"):
        load_config(None, [("optim.lr", "1e30"), ("optim.warmup_steps", "0")])


# ---------------------------------------------------------------------------
# Run config: NaN and inf nowhere, ranges by name


def _float_keys():
    """Every float-valued key of the run config, the model section's included."""
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            if "float" in str(f.type) and "list" not in str(f.type):
                yield f"{section.name}.{f.name}"
    yield "loss.temperature.start"


@pytest.mark.parametrize("key", list(_float_keys()))
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_every_float_key_refuses_nan_and_inf_by_name(key, value):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + " must be a finite number"):
        load_config(None, [(key, value)])


def test_float_lists_refuse_nan_by_position():
    with pytest.raises(ConfigError, match=r"loss\.scales\[1\] must be a finite number, got inf"):
        load_config(None, [("loss.scales", "[1.0, .inf]")])


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("optim.lr", "100", r"optim\.lr must be in \(0, 10\]"),
        ("optim.text_lr", "1e6", r"optim\.text_lr must be in \(0, 10\]"),
        ("optim.weight_decay", "1e6", r"optim\.weight_decay must be in \[0, 10\]"),
        ("optim.eps", "2", r"eps in \(0, 1\)"),
        ("loss.weight", "1e9", r"loss\.weight must be in \[0, 1000\]"),
        ("loss.scales", "[1.0, 1e9]", r"loss\.scales must be a non-empty list of numbers in \(0, 100\]"),
        ("data.color_jitter", "-1", r"data\.color_jitter must be >= 0"),
        ("model.init_logit_scale", "100", r"model\.init_logit_scale must be in \[-4\.6052, 4\.6052\]"),
        ("model.init_logit_bias", "1e6", r"model\.init_logit_bias must be in \[-100, 100\]"),
        ("train.seed", "-1", r"train\.seed must be in \[0, 2\*\*32 - 1\], got -1"),
        ("train.seed", str(2**32), r"train\.seed must be in"),
        ("model.context_length", "1", r"model\.context_length must be at least 2 \(room for the start"),
        ("model.vocab_size", "2", r"model\.vocab_size must be at least 3"),
        ("model.mlp_ratio", "1000", r"model\.mlp_ratio must be in \(0, 64\]"),
        ("model.mlp_ratio", "0.001", r"model\.mlp_ratio must be in \(0, 64\] and give an MLP of >= 1 unit"),
        ("model.vision_layers", "1000000000", r"model\.vision_layers=1000000000 is above the limit 256"),
        ("model.image_size", str(2**20), r"model\.image_size=1048576 is above the limit 4096"),
    ],
)
def test_out_of_range_values_are_refused_by_name(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [(key, value)])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--train.seed", "-1"], r"config error: train\.seed must be in"),
        (["--model.mlp_ratio", "nan"], r"config error: model\.mlp_ratio must be a finite number"),
        (["--model.context_length", "1"], r"config error: model\.context_length must be at least 2"),
        (["--optim.lr", "1e30", "--optim.warmup_steps", "0"], r"config error: optim\.lr must be in"),
        # only the data step can tell: the tokenizer is trained on the captions
        (["--model.vocab_size", "3"], r"^error: model\.vocab_size=3 is too small for a trained tokenizer"),
    ],
)
def test_the_train_cli_says_one_line_instead_of_a_traceback(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        train_run(tmp_path, "cli", "--steps", "1", *args)


# ---------------------------------------------------------------------------
# ModelConfig: types, sizes and the parameter count, checked before any allocation


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(vision_width="96"), r"model\.vision_width: expected int, got str '96'"),
        (dict(text_layers=2.0), r"model\.text_layers: expected int, got float"),
        (dict(vision_layers=True), r"model\.vision_layers: expected int, got bool"),
        (dict(mlp_ratio="4"), r"model\.mlp_ratio: expected a number, got '4'"),
        (dict(mlp_ratio=math.nan), r"model\.mlp_ratio must be a finite number"),
        (dict(layer_norm_eps=math.inf), r"model\.layer_norm_eps must be a finite number"),
        (dict(init_logit_scale=math.nan), r"model\.init_logit_scale must be a finite number"),
        (dict(activation="relu"), r"model\.activation must be"),
    ],
)
def test_a_directly_built_model_config_checks_types(change, message):
    from mlx_clip.models.model import create_model

    with pytest.raises(ConfigError, match=message):
        create_model(ModelConfig(**dict(ODD_ARCH, **change)))


@pytest.mark.parametrize(
    "arch", [ODD_ARCH, dict(ODD_ARCH, init_logit_scale=math.log(10.0), init_logit_bias=-10.0, mlp_ratio=2.5)]
)
def test_the_parameter_estimate_is_the_built_models_count(arch):
    from mlx_clip.models.model import create_model

    cfg = ModelConfig(**arch)
    model = create_model(cfg, seed=0)
    assert cfg.num_parameters == sum(v.size for _, v in tree_flatten(model.parameters()))


def test_the_parameter_estimate_of_vit_b32_is_openais_count():
    from mlx_clip.models.config import model_config

    assert model_config("vit_b32").num_parameters == 151_277_313  # as tests/test_model.py builds it


def test_a_model_above_the_parameter_bound_is_refused_before_allocation():
    # 256 layers of width 16384: every size is within its own cap, the whole is ~825B parameters
    huge = ModelConfig(vision_width=16384, vision_heads=128, vision_layers=256)
    started = time.perf_counter()
    with pytest.raises(
        ConfigError, match=r"model: this architecture has about 825 billion parameters, above"
    ):
        huge.validate()
    assert time.perf_counter() - started < 0.5
    ModelConfig(vision_width=4096, vision_heads=32, vision_layers=48).validate()  # ~10B: allowed


# ---------------------------------------------------------------------------
# HF config.json: a clear message naming the file and the key, before any allocation


def _hf_config():
    from mlx_clip.interop.hf import hf_config_json

    return hf_config_json(ModelConfig(**ODD_ARCH))


def _bad_hf(section, key, value):
    config = _hf_config()
    (config[section] if section else config)[key] = value
    return config


def _wide_hf():
    config = _hf_config()
    config["vision_config"].update(hidden_size=65536, intermediate_size=4 * 65536, num_attention_heads=4)
    return config


@pytest.mark.parametrize(
    "config,message",
    [
        ([1, 2], r"expected a JSON object \(a CLIPModel or SiglipModel config\), got list"),
        ("clip", r"expected a JSON object .*got str"),
        (dict(model_type="clip", text_config=[1]), r"text_config must be a mapping, got list"),
        (
            _bad_hf("vision_config", "hidden_size", "96"),
            r"vision_config\.hidden_size must be an integer .*'96'",
        ),
        (
            _bad_hf("text_config", "hidden_size", 0),
            r"text_config\.hidden_size must be an integer in \[1, 65536\]",
        ),
        (
            _bad_hf("text_config", "intermediate_size", 0),
            r"text_config\.intermediate_size must be an integer",
        ),
        (
            _bad_hf("vision_config", "image_size", 2**20),
            r"vision_config\.image_size must be .*4096\], got 1048576",
        ),
        (
            _bad_hf("vision_config", "image_size", [48, 32]),
            r"vision_config\.image_size=\[48, 32\]: only square",
        ),
        (
            _bad_hf("vision_config", "num_hidden_layers", 1e9),
            r"num_hidden_layers must be .*256\], got 1000000000\.0",
        ),
        (_bad_hf("text_config", "layer_norm_eps", "small"), r"text_config\.layer_norm_eps must be a number"),
        (_bad_hf("", "projection_dim", None), r"projection_dim must be an integer in \[1, 65536\], got None"),
        # each size within its cap, the model ~150B parameters
        (_wide_hf(), r"model: this architecture has about 155 billion parameters, above the limit"),
    ],
)
def test_hf_configs_are_refused_by_file_and_key(config, message):
    from mlx_clip.interop.hf import hf_model_config

    with pytest.raises(ConfigError, match=rf"^config\.json: .*{message}"):
        hf_model_config(config)


def test_convert_cli_refuses_a_bad_hf_config_in_one_line(tmp_path):
    from mlx_clip.convert import main as convert_main

    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_bad_hf("vision_config", "num_hidden_layers", 1e9)))
    where = re.escape(str(src / "config.json"))
    with pytest.raises(SystemExit, match=rf"^error: {where}: vision_config\.num_hidden_layers must be"):
        convert_main(["--from", "hf", str(src), "--out", str(tmp_path / "out")])
    (src / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(SystemExit, match=r"config\.json: expected a JSON object"):
        convert_main(["--from", "hf", str(src), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(head_width=0), r"model_cfg\.vision_cfg\.head_width must be a positive integer, got 0"),
        (dict(width="96"), r"model_cfg\.vision_cfg\.width must be a positive integer, got '96'"),
        (dict(layers=2**30), r"model_cfg\.vision_layers=1073741824 is above the limit 256"),
    ],
)
def test_open_clip_configs_are_checked_before_arithmetic_and_allocation(change, message):
    from mlx_clip.interop.open_clip import open_clip_cfg, open_clip_model_config

    config = open_clip_cfg(ModelConfig(**ODD_ARCH))
    config["vision_cfg"].update(change)
    with pytest.raises(ConfigError, match=message):
        open_clip_model_config(config)
