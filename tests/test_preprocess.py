"""A checkpoint's own preprocessing (ModelConfig image_mean / image_std / resize_mode / interpolation):
CLIP's pixels by default, HF's and open_clip's transforms for the other settings, used by predict,
training's loaders, and carried through HF / open_clip import and export."""

import dataclasses
import json
import warnings

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

import mlx_clip
from mlx_clip.config import load_config
from mlx_clip.data.decode import decode_image, open_lazy
from mlx_clip.data.pipeline import ArraySource, Loader
from mlx_clip.data.run_data import build_run_data
from mlx_clip.data.transforms import EXACT_RESIZE_LIMIT, ImagePreprocess, eval_transform, train_transform
from mlx_clip.inference import encode_images
from mlx_clip.interop.files import write_checkpoint
from mlx_clip.interop.hf import export_hf, import_hf
from mlx_clip.interop.open_clip import export_open_clip, import_open_clip
from mlx_clip.interop.preprocess import hf_preprocess_fields, open_clip_preprocess_fields
from mlx_clip.models.config import OPENAI_MEAN, OPENAI_STD, ModelConfig
from mlx_clip.models.model import create_model
from mlx_clip.schema import ConfigError
from mlx_clip.text.vocab import train_tokenizer

SIGLIP = ImagePreprocess((0.5,) * 3, (0.5,) * 3, "squash", "bilinear")
SIGLIP_FIELDS = dict(
    image_mean=[0.5] * 3, image_std=[0.5] * 3, resize_mode="squash", interpolation="bilinear"
)
# (height, width): non-square both ways, smaller and larger than S, odd sizes.
SHAPES = [(50, 80), (97, 61), (40, 40), (300, 200), (33, 47), (19, 29)]
S = 24


def images(shapes=SHAPES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def clip_reference(im: Image.Image, size: int) -> np.ndarray:
    """Today's (and CLIP's) eval pixels spelled out: bicubic shorter side -> size (longer side
    truncated), centre crop at rounded offsets, x * (1 / (255 std)) - mean / std in float32."""
    w, h = im.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if new != im.size:
        im = im.resize(new, Image.Resampling.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    x = np.asarray(im)[top : top + size, left : left + size].astype(np.float32)
    mean, std = np.asarray(OPENAI_MEAN), np.asarray(OPENAI_STD)
    return x * (1.0 / (255.0 * std)).astype(np.float32) - (mean / std).astype(np.float32)


def test_defaults_are_clips_pixels_bit_for_bit():
    # A checkpoint header or config.yaml written before these fields existed gets CLIP's.
    default = ImagePreprocess.of(ModelConfig.from_dict({"embed_dim": 512}))
    assert default == ImagePreprocess()
    for im in images():
        ours = default.eval_transform(S)(im)
        np.testing.assert_array_equal(ours, clip_reference(im, S))
        np.testing.assert_array_equal(ours, eval_transform(S)(im))
        for kw in ({}, dict(color_jitter=0.3, hflip=True)):
            a = default.train_transform(S, **kw)(im, np.random.default_rng(1))
            np.testing.assert_array_equal(a, train_transform(S, **kw)(im, np.random.default_rng(1)))


def _hf_pixels(processor, im):
    return processor(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _pil_processor(transformers, name):
    """transformers 5 names the PIL implementation `<name>Pil` (the plain name is torchvision's,
    whose filters differ from PIL's by up to a few 8-bit levels); transformers 4's is PIL."""
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def test_squash_bilinear_half_mean_matches_hf_siglip_processor():
    transformers = pytest.importorskip("transformers")
    cls = _pil_processor(transformers, "SiglipImageProcessor")
    hf = cls(size={"height": S, "width": S}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for im in images():
        np.testing.assert_allclose(SIGLIP.eval_transform(S)(im), _hf_pixels(hf, im), atol=1e-5, rtol=0)


def test_shortest_bicubic_matches_hf_clip_processor():
    transformers = pytest.importorskip("transformers")
    hf = _pil_processor(transformers, "CLIPImageProcessor")(
        size={"shortest_edge": S}, crop_size={"height": S, "width": S}
    )
    # HF crops at floor((n - S) / 2), CLIP and mlx_clip at round(): these shapes give the same offset.
    for im in images([(97, 61), (300, 200), (33, 47), (40, 40)]):
        np.testing.assert_allclose(
            ImagePreprocess().eval_transform(S)(im), _hf_pixels(hf, im), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_squash_matches_open_clip_transform(interpolation):
    """open_clip's eval transform on PIL images resizes with PIL too: equal up to float rounding."""
    open_clip = pytest.importorskip("open_clip")
    ours = ImagePreprocess((0.5,) * 3, (0.5,) * 3, "squash", interpolation)
    theirs = open_clip.image_transform(
        S, is_train=False, mean=ours.mean, std=ours.std, resize_mode="squash", interpolation=interpolation
    )
    for im in images():
        np.testing.assert_allclose(
            ours.eval_transform(S)(im), theirs(im).numpy().transpose(1, 2, 0), atol=1e-5, rtol=0
        )


def test_squash_of_a_thin_strip_is_bounded_and_close():
    """A 3 x 5000 strip is resized along its length first (no S x 5000 buffer); PIL rounds between
    its two passes, so the order may move a pixel by one 8-bit level (measured: equal, Pillow 13)."""
    strip = images([(5000, 3)])[0]
    ours = SIGLIP.eval_transform(S)(strip)
    plain = SIGLIP.normalize(np.asarray(strip.resize((S, S), Image.Resampling.BILINEAR)))
    assert ours.shape == (S, S, 3)
    assert np.abs(ours - plain).max() <= 1 / 255 / 0.5 + 1e-6


def test_squash_work_is_bounded(tmp_path, monkeypatch):
    """Squash keeps decode_image's bounds: a 1 x 200,000 strip never makes an S x 200,000 buffer,
    and a large JPEG decodes at a reduced scale (within a few 8-bit levels of the full decode)."""
    Image.new("RGB", (1, 200_000), (90, 120, 150)).save(tmp_path / "thin.png")
    calls, resize = [], Image.Image.resize

    def spy(im, size, resample=None, box=None, **kw):
        box = box or (0, 0, *im.size)
        calls.append(size[0] * (box[3] - box[1]))  # PIL's buffer after its horizontal pass
        return resize(im, size, resample, box, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out = decode_image(tmp_path / "thin.png", SIGLIP.eval_transform(224), max_aspect=None)
    assert calls and max(calls) <= EXACT_RESIZE_LIMIT * 224 * 224
    np.testing.assert_allclose(out, np.broadcast_to(SIGLIP.normalize(np.uint8([90, 120, 150])), out.shape))
    monkeypatch.undo()
    x = np.linspace(0, 255, 1024)
    smooth = np.stack(np.broadcast_arrays(x[None, :], x[::-1, None][:768], 128 + 0 * x[None, :]), -1)
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "big.jpg", quality=95)
    lazy = open_lazy(tmp_path / "big.jpg")
    reduced = SIGLIP.eval_transform(32)(lazy)
    assert lazy.size == (256, 192)  # 1/4 scale: still 6x the output on the shorter side
    full = SIGLIP.eval_transform(32)(Image.open(tmp_path / "big.jpg").convert("RGB"))
    assert np.abs(reduced - full).max() < 4 / 255 / 0.5


# ---------------------------------------------------------------------------
# The checkpoint's settings are what predict, training and evaluation use


@pytest.fixture(scope="module")
def siglip_ckpt(tmp_path_factory):
    """A tiny checkpoint with SigLIP's preprocessing (random weights, a small trained vocab)."""
    cfg = ModelConfig(
        embed_dim=16, image_size=S, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
        context_length=8, vocab_size=600, text_width=32, text_layers=1, text_heads=2, **SIGLIP_FIELDS,
    )  # fmt: skip
    state = {k: np.array(v) for k, v in tree_flatten(create_model(cfg, seed=0).parameters())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus pads the vocab with unused tokens
        tok = train_tokenizer(["a red circle", "a blue square"] * 20, 600)
    return write_checkpoint(tmp_path_factory.mktemp("pp") / "ckpt", cfg, state, tok, "test", force=True)


def test_predict_uses_the_checkpoints_preprocessing(siglip_ckpt, tmp_path):
    model, _, preprocess = mlx_clip.load(siglip_ckpt)
    assert model.config.resize_mode == "squash" and preprocess.settings == SIGLIP
    im = images([(30, 70)])[0]
    im.save(tmp_path / "a.png")
    feats = encode_images(model, preprocess, [tmp_path / "a.png"])
    pixels = (np.asarray(im.resize((S, S), Image.Resampling.BILINEAR), np.float32) / 255 - 0.5) / 0.5
    manual = np.array(model.encode_image(mx.array(pixels[None])))
    np.testing.assert_allclose(feats, manual, atol=1e-5)


def test_eval_cli_uses_the_checkpoints_preprocessing(siglip_ckpt, tmp_path, monkeypatch):
    from mlx_clip.eval import main as eval_main
    from mlx_clip.evaluation import suite

    seen, real = [], suite.image_features

    def spy(dataset, encode_image, image_size, **kw):
        seen.append(kw["preprocess"])
        return real(dataset, encode_image, image_size, **kw)

    monkeypatch.setattr(suite, "image_features", spy)
    for k, name in enumerate(["cat", "dog"]):
        (tmp_path / "set" / name).mkdir(parents=True)
        for i, im in enumerate(images([(30, 40), (41, 29)], seed=k)):
            im.save(tmp_path / "set" / name / f"{i}.png")
    out = tmp_path / "eval.json"
    eval_main(["--checkpoint", str(siglip_ckpt), "--zeroshot", f"pets={tmp_path / 'set'}", "--out", str(out)])
    assert seen == [SIGLIP] and out.is_file()


def test_loaders_use_the_model_preprocessing():
    """Training's loaders (the synthetic set included) normalise with the model's mean/std."""
    cfg = load_config(
        None,
        [
            ("model.arch", "custom"), ("model.image_size", "32"), ("model.patch_size", "8"),
            ("model.vision_width", "32"), ("model.vision_heads", "2"), ("model.vision_layers", "1"),
            ("model.text_width", "32"), ("model.text_heads", "2"), ("model.text_layers", "1"),
            ("model.context_length", "8"), ("model.vocab_size", "600"), ("model.embed_dim", "16"),
            ("model.image_mean", "[0.5, 0.5, 0.5]"), ("model.image_std", "[0.5, 0.5, 0.5]"),
            ("model.resize_mode", "squash"), ("model.interpolation", "bilinear"),
            ("data.builtin_train_size", "32"), ("data.builtin_val_size", "16"), ("data.batch_size", "16"),
        ],
    )  # fmt: skip
    mcfg = cfg.model_config()
    data = build_run_data(cfg, mcfg)
    assert data.train.preprocess == data.evals["val"].loader.preprocess == SIGLIP
    images_u8 = data.train._array.images
    batch = next(iter(data.train.epoch(0)))
    np.testing.assert_array_equal(batch["images"], SIGLIP.normalize(images_u8[batch["index"]]))
    # The per-sample path (a source not at model size) resizes with the model's filter and mode.
    src = ArraySource(images_u8[:4, :, :20], [["x"]] * 4)
    loader = Loader(src, 4, 32, train=False, num_workers=0, preprocess=SIGLIP)
    got = next(iter(loader.epoch(0)))["images"]
    np.testing.assert_array_equal(got, np.stack([SIGLIP.eval_transform(32)(x) for x in src.images]))


# ---------------------------------------------------------------------------
# Import and export


def test_hf_export_writes_and_import_reads_the_preprocessing(siglip_ckpt, tmp_path):
    export_hf(siglip_ckpt, tmp_path / "hf")
    pp = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert pp["size"] == {"height": S, "width": S} and not pp["do_center_crop"]
    assert pp["resample"] == 2 and pp["image_mean"] == pp["image_std"] == [0.5] * 3
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    for im in images():
        np.testing.assert_allclose(_hf_pixels(hf, im), SIGLIP.eval_transform(S)(im), atol=1e-5, rtol=0)
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = mlx_clip.load(tmp_path / "back")[0].config
    assert {k: getattr(back, k) for k in SIGLIP_FIELDS} == SIGLIP_FIELDS
    # A SigLIP-style processor file, as Google's checkpoints ship it (defaults left out).
    siglip_pp = {"image_processor_type": "SiglipImageProcessor", "size": {"height": S, "width": S}}
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps({**siglip_pp, "resample": 2}))
    import_hf(tmp_path / "hf", tmp_path / "back2")
    back = mlx_clip.load(tmp_path / "back2")[0].config
    assert {k: getattr(back, k) for k in SIGLIP_FIELDS} == SIGLIP_FIELDS


def test_open_clip_export_writes_and_import_reads_the_preprocessing(siglip_ckpt, tmp_path):
    export_open_clip(siglip_ckpt, tmp_path / "oc")
    config = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"] == {
        "size": S, "mode": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3,
        "interpolation": "bilinear", "resize_mode": "squash",
    }  # fmt: skip
    import_open_clip(tmp_path / "oc", tmp_path / "back")
    back = mlx_clip.load(tmp_path / "back")[0].config
    assert {k: getattr(back, k) for k in SIGLIP_FIELDS} == SIGLIP_FIELDS


def test_default_preprocessing_round_trips_unchanged():
    cfg = ModelConfig()
    from mlx_clip.interop.preprocess import hf_preprocessor_config, open_clip_preprocess_cfg

    fields = {k: getattr(cfg, k) for k in SIGLIP_FIELDS}
    assert hf_preprocess_fields(hf_preprocessor_config(cfg), cfg.image_size) == fields
    assert open_clip_preprocess_fields(open_clip_preprocess_cfg(cfg), cfg.image_size) == fields
    assert hf_preprocess_fields({}, 224) == fields  # CLIPImageProcessor's defaults are CLIP's
    no_norm = hf_preprocess_fields({"size": {"height": 224, "width": 224}, "do_normalize": False}, 224)
    assert no_norm["image_mean"] == [0.0] * 3 and no_norm["image_std"] == [1.0] * 3


# ---------------------------------------------------------------------------
# Refusals name the field


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(image_std=[0.5, 0.0, 0.5]), r"model\.image_std must be positive"),
        (dict(image_mean=[0.5, 0.5]), r"model\.image_mean must be 3 numbers"),
        (dict(image_mean=[123.7, 116.3, 103.5]), r"model\.image_mean must be in \[0, 1\]"),
        (dict(resize_mode="crop"), r"model\.resize_mode must be 'shortest' or 'squash'"),
        (dict(interpolation="lanczos"), r"model\.interpolation must be"),
    ],
)
def test_bad_model_values_name_the_field(change, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict({**dataclasses.asdict(ModelConfig()), **change})


@pytest.mark.parametrize(
    "pp, match",
    [
        ({"resample": 1}, r"resample=1 \(lanczos\)"),
        ({"do_rescale": False}, "do_rescale=False"),
        ({"size": {"shortest_edge": 256}}, r"size.shortest_edge is 256 but the model's image_size is 224"),
        ({"size": {"longest_edge": 224}}, "expected one square size"),
        ({"image_processor_type": "ViTImageProcessor"}, "image_processor_type='ViTImageProcessor'"),
        ({"image_std": [0.5, 0.5]}, "image_std must be a number or 3 numbers"),
    ],
)
def test_hf_preprocessor_refusals_name_the_key(pp, match):
    with pytest.raises(ConfigError, match=match):
        hf_preprocess_fields(pp, 224)


def test_open_clip_refusals_name_the_key():
    with pytest.raises(ConfigError, match=r"preprocess_cfg.resize_mode='longest'.*not supported"):
        open_clip_preprocess_fields({"resize_mode": "longest"}, 224)
    with pytest.raises(ConfigError, match=r"preprocess_cfg.interpolation='nearest'"):
        open_clip_preprocess_fields({"interpolation": "nearest"}, 224)
    from mlx_clip.interop.preprocess import open_clip_preprocess_cfg

    with pytest.raises(ConfigError, match="interpolation='nearest': open_clip"):
        open_clip_preprocess_cfg(dataclasses.replace(ModelConfig(), interpolation="nearest"))


# ---------------------------------------------------------------------------
# Fine-tuning and resuming keep the checkpoint's pixels

TINY_RUN = [
    ("model.arch", "custom"), ("model.image_size", str(S)), ("model.patch_size", "8"),
    ("model.vision_width", "32"), ("model.vision_heads", "2"), ("model.vision_layers", "1"),
    ("model.text_width", "32"), ("model.text_heads", "2"), ("model.text_layers", "1"),
    ("model.context_length", "8"), ("model.vocab_size", "600"), ("model.embed_dim", "16"),
]  # fmt: skip


def test_init_from_refuses_other_preprocessing_unless_set(siglip_ckpt):
    from mlx_clip.training.resume import check_init_preprocessing

    weights = siglip_ckpt / "model.safetensors"
    with pytest.raises(
        ConfigError, match=r"image_mean \[0\.5, 0\.5, 0\.5\].*--model\.resize_mode squash"
    ) as e:
        check_init_preprocessing(load_config(None, TINY_RUN), weights)
    flags = str(e.value).split("Keep the checkpoint's with ")[1].split(", or set")[0].split(" --")
    pairs = [(f.removeprefix("--").split(" ", 1)[0], f.split(" ", 1)[1].strip("'")) for f in flags]
    cfg = load_config(None, TINY_RUN + pairs)  # the flags the message gives
    check_init_preprocessing(cfg, weights)
    assert ImagePreprocess.of(cfg.model_config()) == SIGLIP
    check_init_preprocessing(load_config(None, TINY_RUN + [("model.image_mean", "[0.4, 0.4, 0.4]")]), None)


def test_resume_of_a_config_written_before_the_fields_is_no_change(tmp_path):
    from mlx_clip.config import config_to_yaml
    from mlx_clip.training.resume import check_config

    new = config_to_yaml(load_config(None, TINY_RUN))
    old = new
    for key in ("image_mean", "image_std"):  # as a config.yaml written before these fields
        old = old.replace(f"  {key}:\n" + "".join(f"  - {v}\n" for v in getattr(ModelConfig(), key)), "")
    old = old.replace("  resize_mode: shortest\n", "").replace("  interpolation: bicubic\n", "")
    assert "image_mean" not in old and "resize_mode" not in old
    (tmp_path / "config.yaml").write_text(old)
    logged = []
    check_config(tmp_path, new, allow_changed=False, log=logged.append)
    assert logged == []


def test_named_siglip_configs_carry_siglips_preprocessing():
    from mlx_clip.models.config import available_models, model_config

    names = [n for n in available_models() if n.startswith("siglip")]
    assert len(names) >= 4
    for name in names:
        cfg = model_config(name)
        assert (cfg.image_mean, cfg.image_std) == ([0.5] * 3, [0.5] * 3), name
        assert (cfg.resize_mode, cfg.interpolation) == ("squash", "bicubic"), name
