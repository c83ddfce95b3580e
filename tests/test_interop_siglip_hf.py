"""Hugging Face SiglipModel in (`python -m mlx_clip.convert --from hf`) and out (`mlx_clip.export
--to hf`), and CLIPModel with a different MLP width per tower.

Every model is a tiny random one built offline with sizes that are not powers of two (text width 40,
vision width 48, 5 and 3 heads, MLPs 100 / 70, 32 px images in 6 px patches: a 2 px remainder), every
tensor perturbed; the tokenizer is a SentencePiece model trained here (test_tokenizers_hf's `spiece`).
Features are compared with transformers' own forward pass, token ids with its AutoTokenizer.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from test_interop import (
    CAPTIONS,
    ODD,
    assert_same_weights,
    hf_clip,
    inputs,
    load_mlx,
    mlx_features,
    mlx_model,
    perturb_torch,
    save_hf,
    save_mlx,
    torch_features,
)
from test_tokenizers_hf import gemma_like, hf_ids, spiece, t5_like  # noqa: F401  (spiece: a module-scoped fixture)

from mlx_clip import convert, export
from mlx_clip.interop.hf import hf_model_config
from mlx_clip.interop.hf_config import hf_config_json, siglip_config_json
from mlx_clip.interop.preprocess import SIGLIP_PREPROCESSING
from mlx_clip.models.config import ModelConfig
from mlx_clip.schema import ConfigError
from mlx_clip.text.vocab import load_tokenizer, train_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")  # transformers' SiglipTokenizer

ATOL = 1e-4


def siglip_config(vocab_size: int, **vision) -> dict:
    text = dict(
        vocab_size=vocab_size,
        hidden_size=40,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=5,
        max_position_embeddings=16,
        projection_size=48,
    )
    vis = dict(
        hidden_size=48,
        intermediate_size=70,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=32,
        patch_size=6,
        **vision,
    )
    return dict(model_type="siglip", text_config=text, vision_config=vis)


def save_siglip(directory, tokenizer_dir, vocab_size: int, seed: int, acts=("gelu_pytorch_tanh",) * 2):
    """A random SiglipModel saved as save_pretrained writes it, beside the tokenizer files (if any);
    acts: the (text, vision) hidden_act."""
    config = siglip_config(vocab_size)
    for section, act in zip(("text_config", "vision_config"), acts, strict=True):
        config[section]["hidden_act"] = act
    torch.manual_seed(seed)
    model = transformers.SiglipModel(
        transformers.SiglipConfig(text_config=config["text_config"], vision_config=config["vision_config"])
    )
    model = perturb_torch(model, seed=seed)
    model.save_pretrained(directory)
    for path in tokenizer_dir.iterdir() if tokenizer_dir else ():
        shutil.copyfile(path, directory / path.name)
    return model


@pytest.fixture(scope="module")
def hf_siglip(spiece, tmp_path_factory):  # noqa: F811
    """A SiglipModel directory with a SigLIP SentencePiece tokenizer, and its conversion."""
    sp_dir, processor = spiece
    directory = tmp_path_factory.mktemp("siglip_hf") / "hf"
    model = save_siglip(directory, sp_dir, processor.get_piece_size(), seed=3)
    out = directory.parent / "mlx"
    convert.main(["--from", "hf", str(directory), "--out", str(out)])
    return model, directory, out


def hf_features(model, images, ids):
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
        txt = model.get_text_features(input_ids=torch.from_numpy(ids).long())
    return [getattr(x, "pooler_output", x).numpy() for x in (img, txt)]


def check_features(model, directory, m, tok):
    """Our features on our ids == transformers' on its AutoTokenizer's ids (which equal ours)."""
    images, _ = inputs(m.config, seed=1)
    ids = tok(CAPTIONS, m.config.context_length)
    np.testing.assert_array_equal(ids, hf_ids(directory, CAPTIONS, m.config.context_length))
    ours = mlx_features(m, images, ids)
    theirs = hf_features(model, images, ids)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)


def test_convert_siglip_features_match(hf_siglip):
    model, directory, out = hf_siglip
    m = load_mlx(out)
    cfg = m.config
    assert (cfg.vision_pool, cfg.patch_bias, cfg.vision_pre_norm, cfg.vision_proj) == (
        "map",
        True,
        False,
        False,
    )
    assert (cfg.text_causal, cfg.text_pool, cfg.text_proj) == (False, "last", "head")
    assert (cfg.embed_dim, cfg.vision_mlp_dim, cfg.text_mlp_dim, cfg.mlp_ratio) == (48, 70, 100, 4.0)
    assert (cfg.activation, cfg.layer_norm_eps, cfg.context_length) == ("gelu_tanh", 1e-6, 16)
    assert cfg.vision_activation is cfg.text_activation is None  # one activation: the shared field
    # no preprocessor_config.json in the directory: SigLIP's preprocessing, as SiglipImageProcessor's
    assert {k: getattr(cfg, k) for k in SIGLIP_PREPROCESSING} == SIGLIP_PREPROCESSING
    assert m.logit_bias.item() == pytest.approx(model.logit_bias.item(), abs=0)
    assert m.logit_scale.item() == pytest.approx(model.logit_scale.item(), abs=0)
    tok = load_tokenizer(out)
    assert (tok.kind, tok.clean, tok.context_length) == ("sentencepiece", "siglip", 16)
    check_features(model, directory, m, tok)


def test_export_siglip_round_trip(hf_siglip, tmp_path):
    _, _, out = hf_siglip
    export.main(["--checkpoint", str(out), "--to", "hf", "--out", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("siglip", ["SiglipModel"])
    hf, info = transformers.SiglipModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    m = load_mlx(out)
    assert hf.logit_bias.item() == m.logit_bias.item()
    check_features(hf.eval(), tmp_path / "hf", m, load_tokenizer(out))
    convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    assert_same_weights(out, tmp_path / "back")  # MLX -> HF -> MLX, bit for bit
    assert load_mlx(tmp_path / "back").config == m.config
    ids = load_tokenizer(tmp_path / "back")(CAPTIONS)
    np.testing.assert_array_equal(ids, load_tokenizer(out)(CAPTIONS))


def test_siglip_with_a_tokenizer_json(tmp_path):
    """A tokenizer.json (T5-style Unigram, EOS appended) comes in and goes back out as itself."""
    tok_dir = t5_like(tmp_path / "t5")
    vocab = load_tokenizer(tok_dir).vocab_size
    model = save_siglip(tmp_path / "hf", tok_dir, vocab, seed=4)
    convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mlx")])
    tok = load_tokenizer(tmp_path / "mlx")
    assert (tok.kind, tok.context_length) == ("hf", 16)
    check_features(model, tmp_path / "hf", load_mlx(tmp_path / "mlx"), tok)
    export.main(["--checkpoint", str(tmp_path / "mlx"), "--to", "hf", "--out", str(tmp_path / "out")])
    ids = hf_ids(tmp_path / "out", CAPTIONS, 16)
    np.testing.assert_array_equal(ids, tok(CAPTIONS))


def test_siglip2_naflex_at_its_grid(tmp_path, capsys):
    """A Siglip2Model (NaFlex: Linear patch embedding, position grid resized per image) imports for its
    grid's fixed resolution, where its features on a square image are ours; it exports as SiglipModel."""
    tok_dir = gemma_like(tmp_path / "gemma", "Siglip2Tokenizer")
    config = siglip_config(load_tokenizer(tok_dir).vocab_size)
    vision = {k: v for k, v in config["vision_config"].items() if k != "image_size"}
    torch.manual_seed(8)
    hf = transformers.Siglip2Model(
        transformers.Siglip2Config(
            text_config=config["text_config"], vision_config=dict(vision, num_patches=25)
        )
    )
    hf = perturb_torch(hf, seed=8)
    hf.save_pretrained(tmp_path / "hf")
    processor_cls = getattr(transformers, "Siglip2ImageProcessorPil", transformers.Siglip2ImageProcessor)
    processor = processor_cls(patch_size=6, max_num_patches=25)  # Google's ship 16 px, 256 patches
    processor.save_pretrained(tmp_path / "hf")
    for path in tok_dir.iterdir():
        shutil.copyfile(path, tmp_path / "hf" / path.name)
    convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mlx")])
    assert "siglip2 (NaFlex): imported for the fixed resolution of its position grid, 30 x 30 px" in (
        capsys.readouterr().out
    )
    m = load_mlx(tmp_path / "mlx")
    assert (m.config.image_size, m.config.patch_size, m.config.vision_pool) == (30, 6, "map")
    # its processor: a square image resized to the 5 x 5 grid of 6 px patches, bilinear, mean/std 0.5
    assert (m.config.resize_mode, m.config.interpolation, m.config.image_mean) == (
        "squash",
        "bilinear",
        [0.5] * 3,
    )
    from PIL import Image

    from mlx_clip.data.transforms import ImagePreprocess

    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (47, 47, 3), dtype=np.uint8))
    ours = ImagePreprocess.of(m.config).eval_transform(30)(im)
    theirs = processor(images=im, return_tensors="np")["pixel_values"][0]  # (25, 6 * 6 * 3) patches
    ours = ours.reshape(5, 6, 5, 6, 3).transpose(0, 2, 1, 3, 4).reshape(25, 108)
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    images, _ = inputs(m.config, seed=3)
    tok = load_tokenizer(tmp_path / "mlx")
    ids = tok(CAPTIONS, 16)
    np.testing.assert_array_equal(ids, hf_ids(tmp_path / "hf", CAPTIONS, 16))
    B = len(images)  # NaFlex input: (row, column, channel)-flattened patches, their mask and grid
    patches = images.reshape(B, 5, 6, 5, 6, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, 25, 108)
    with torch.no_grad():
        img = hf.get_image_features(
            pixel_values=torch.from_numpy(patches),
            pixel_attention_mask=torch.ones(B, 25, dtype=torch.long),
            spatial_shapes=torch.tensor([[5, 5]] * B),
        )
        txt = hf.get_text_features(input_ids=torch.from_numpy(ids).long())
    theirs = [getattr(x, "pooler_output", x).numpy() for x in (img, txt)]
    for a, b in zip(mlx_features(m, images, ids), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    export.main(["--checkpoint", str(tmp_path / "mlx"), "--to", "hf", "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "siglip"
    convert.main(["--from", "hf", str(tmp_path / "out"), "--out", str(tmp_path / "back")])
    assert_same_weights(tmp_path / "mlx", tmp_path / "back")


# A SigLIP-shaped mlx_clip model (trained here with a CLIP BPE, say)
SIGLIP_SHAPED = dict(
    embed_dim=48,
    image_size=30,
    patch_size=6,
    vision_width=48,
    vision_layers=2,
    vision_heads=3,
    vision_pool="map",
    patch_bias=True,
    vision_pre_norm=False,
    vision_proj=False,
    vision_mlp_dim=70,
    context_length=12,
    vocab_size=530,
    text_width=40,
    text_layers=1,
    text_heads=5,
    text_causal=False,
    text_pool="last",
    text_proj="head",
    activation="gelu_tanh",
    layer_norm_eps=1e-6,
    init_logit_scale=math.log(10.0),
    init_logit_bias=-10.0,
)


def test_export_siglip_shaped_model_with_clip_tokenizer(tmp_path, capsys):
    tok = train_tokenizer(CAPTIONS * 4, 530)
    m = mlx_model(SIGLIP_SHAPED, seed=5)
    ckpt = save_mlx(m, tmp_path / "ckpt", tok)
    export.main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert "tok.pad_token_id = 0" in capsys.readouterr().out
    hf, info = transformers.SiglipModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_tok.pad_token_id = 0  # as the export's note says
    ids = tok(CAPTIONS, 12)
    theirs = hf_tok(CAPTIONS, padding="max_length", max_length=12, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, np.array(theirs))
    images, _ = inputs(m.config, seed=2)
    for a, b in zip(mlx_features(m, images, ids), hf_features(hf.eval(), images, ids), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)


def test_clip_with_per_tower_mlp_widths(tmp_path):
    hf = hf_clip(ODD, 2, seed=7)  # widths 60 / 50, MLP ratio 3 ...
    config = hf.config
    config.vision_config.intermediate_size = 70  # ... then 70 in the vision tower: not 3x, not 4x
    torch.manual_seed(7)
    hf = perturb_torch(transformers.CLIPModel(config), seed=7)
    save_hf(hf, tmp_path / "hf")
    convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mlx")])
    m = load_mlx(tmp_path / "mlx")
    assert (m.config.vision_mlp_dim, m.config.text_mlp_dim, m.config.mlp_ratio) == (70, 150, 4.0)
    images, tokens = inputs(m.config)
    ours = mlx_features(m, images, tokens)
    theirs = torch_features(hf.get_image_features, hf.get_text_features, images, tokens)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    export.main(["--checkpoint", str(tmp_path / "mlx"), "--to", "hf", "--out", str(tmp_path / "out")])
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    assert back["architectures"] == ["CLIPModel"]
    assert (back["vision_config"]["intermediate_size"], back["text_config"]["intermediate_size"]) == (70, 150)


def test_refusals_name_the_field(tmp_path):
    good = siglip_config(300)
    assert hf_model_config(good).vision_pool == "map"

    def refused(config, pattern):
        with pytest.raises(ConfigError, match=pattern):
            hf_model_config(config)

    naflex = json.loads(json.dumps(dict(good, model_type="siglip2")))
    del naflex["vision_config"]["image_size"]
    naflex["vision_config"]["num_patches"] = 24
    refused(naflex, r"vision_config.num_patches=24 is not a square grid")
    refused(dict(good, model_type="siglip2"), r"vision_config.image_size: a siglip2 \(NaFlex\) config has")
    refused(dict(good, model_type="blip"), r"model_type='blip'; mlx_clip reads 'clip'.*'siglip'")
    for section, key, value, pattern in [
        ("vision_config", "vision_use_head", False, r"vision_config.vision_use_head=False"),
        ("vision_config", "num_channels", 1, r"vision_config.num_channels=1"),
        ("text_config", "model_type", "xlm-roberta", r"text_config.model_type='xlm-roberta'"),
        ("text_config", "projection_size", 40, r"text_config.projection_size=40 differs"),
        ("text_config", "hidden_act", "relu", r"text_config.hidden_act='relu'"),
        ("vision_config", "layer_norm_eps", 1e-5, r"layer_norm_eps differs"),
    ]:
        bad = json.loads(json.dumps(good))
        bad[section][key] = value
        refused(bad, pattern)
    # the config we write reads back as the same ModelConfig (SigLIP's preprocessing: hf_config.py)
    cfg = ModelConfig.from_dict(dict(SIGLIP_SHAPED, image_size=32, **SIGLIP_PREPROCESSING))
    assert hf_model_config(siglip_config_json(cfg)) == cfg


def test_export_refuses_what_neither_class_holds(tmp_path):
    mixed = dict(SIGLIP_SHAPED, text_pool="argmax", text_causal=True)  # MAP pooling + CLIP's text
    ckpt = save_mlx(mlx_model(mixed, seed=6), tmp_path / "ckpt")
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")])
    msg = str(e.value.code)
    assert "neither transformers' CLIPModel nor SiglipModel" in msg
    assert "vision_pool='map' (needs 'cls')" in msg and "text_pool='argmax' (needs 'last')" in msg
    assert "--to torch_ref" in msg and "--to open_clip" in msg
    assert not (tmp_path / "hf").exists()


def test_published_shapes_map_to_the_named_configs():
    """transformers' own SiglipConfig for SigLIP B/16 (its defaults) and SO400M/14 (MLP 4304, not 4x)
    reads as configs/models/siglip_*.yaml, so a converted checkpoint is named after them; an mlx_clip
    gelu_tanh model goes out as HF's gelu_pytorch_tanh and back."""
    from mlx_clip.models.config import model_config

    assert hf_model_config(transformers.SiglipConfig().to_dict()) == model_config("siglip_b16_224")
    assert hf_model_config({"model_type": "siglip"}) == model_config("siglip_b16_224")  # our defaults
    clip = hf_model_config(transformers.CLIPConfig().to_dict())  # each class keeps its own defaults
    assert hf_model_config({"model_type": "clip"}) == clip == model_config("vit_b32")
    so400m = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27)
    config = transformers.SiglipConfig(
        text_config=dict(so400m, projection_size=1152),
        vision_config=dict(so400m, image_size=384, patch_size=14),
    )
    assert hf_model_config(config.to_dict()) == model_config("siglip_so400m14_384")
    cfg = ModelConfig.from_dict(dict(ODD, activation="gelu_tanh"))
    assert hf_config_json(cfg)["text_config"]["hidden_act"] == "gelu_pytorch_tanh"
    assert hf_model_config(hf_config_json(cfg)) == cfg


def test_siglip_keys_are_checked_by_name(hf_siglip, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, directory, _ = hf_siglip
    state = load_file(directory / "model.safetensors")
    for change, pattern in [
        (lambda s: s.pop("vision_model.head.attention.in_proj_weight"), r"missing key 'vision_model\.head"),
        (
            lambda s: s.update({"vision_model.extra.weight": s["logit_bias"]}),
            r"unexpected key 'vision_model\.extra",
        ),
        (lambda s: s.update({"logit_bias": s["logit_bias"].repeat(2)}), r"key 'logit_bias' has shape \(2,\)"),
    ]:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(directory, bad)
        broken = dict(state)
        change(broken)
        save_file(broken, str(bad / "model.safetensors"))
        with pytest.raises(SystemExit, match=pattern):
            convert.main(["--from", "hf", str(bad), "--out", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()


def test_siglip_import_says_which_preprocessing(hf_siglip, tmp_path):
    """Without a preprocessor_config.json the note names SigLIP's; with the exported one, the file."""
    from mlx_clip.interop.hf import import_hf

    _, directory, out = hf_siglip
    notes = import_hf(directory, tmp_path / "a")
    want = "squash bicubic, mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)"
    assert f"preprocessing: no preprocessor_config.json, SigLIP's kept ({want})" in notes
    export.main(["--checkpoint", str(out), "--to", "hf", "--out", str(tmp_path / "hf")])
    notes = import_hf(tmp_path / "hf", tmp_path / "b")
    assert f"preprocessing: {want} (from preprocessor_config.json)" in notes
    assert load_mlx(tmp_path / "b").config == load_mlx(out).config


def test_export_writes_siglips_image_processor(hf_siglip, tmp_path):
    """An exported SigLIP's preprocessor_config.json is a SiglipImageProcessor giving our pixels."""
    from PIL import Image

    from mlx_clip.data.transforms import ImagePreprocess

    _, _, out = hf_siglip
    cfg = load_mlx(out).config
    export.main(["--checkpoint", str(out), "--to", "hf", "--out", str(tmp_path / "hf")])
    pp = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert (pp["image_processor_type"], pp["processor_class"]) == ("SiglipImageProcessor", "SiglipProcessor")
    hf = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    assert type(hf).__name__.startswith("SiglipImageProcessor"), type(hf)
    ours = ImagePreprocess.of(cfg).eval_transform(cfg.image_size)
    rng = np.random.default_rng(0)
    for h, w in [(50, 80), (97, 61), (32, 32), (19, 29)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        theirs = hf(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        np.testing.assert_allclose(theirs, ours(im), atol=1e-5, rtol=0)


def test_towers_with_different_activations(tmp_path):
    """A SiglipModel whose towers use different activations (SigLIP 2's exact-GELU image tower and
    tanh-GELU text tower) imports with a vision_activation, gives transformers' features, and exports
    each tower's hidden_act back; CLIPModel's config.json does the same."""
    model = save_siglip(tmp_path / "hf", None, 300, seed=9, acts=("gelu_pytorch_tanh", "gelu"))
    convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mlx")])
    m = load_mlx(tmp_path / "mlx")
    assert (m.config.tower_activation("vision"), m.config.tower_activation("text")) == ("gelu", "gelu_tanh")
    images, ids = inputs(m.config, seed=2)
    for a, b in zip(mlx_features(m, images, ids), hf_features(model, images, ids), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    export.main(["--checkpoint", str(tmp_path / "mlx"), "--to", "hf", "--out", str(tmp_path / "out")])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    acts = config["text_config"]["hidden_act"], config["vision_config"]["hidden_act"]
    assert acts == ("gelu_pytorch_tanh", "gelu")
    hf = transformers.SiglipModel.from_pretrained(tmp_path / "out").eval()
    for a, b in zip(mlx_features(m, images, ids), hf_features(hf, images, ids), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    config = hf_clip(ODD, 2, seed=9).config  # a CLIPModel: quick_gelu text tower, exact-GELU image tower
    config.vision_config.hidden_act = "gelu"
    torch.manual_seed(9)
    clip = perturb_torch(transformers.CLIPModel(config), seed=9).eval()
    save_hf(clip, tmp_path / "clip")
    convert.main(["--from", "hf", str(tmp_path / "clip"), "--out", str(tmp_path / "clip_mlx")])
    m = load_mlx(tmp_path / "clip_mlx")
    assert (m.config.activation, m.config.vision_activation) == ("quick_gelu", "gelu")
    images, ids = inputs(m.config, seed=2)
    theirs = torch_features(clip.get_image_features, clip.get_text_features, images, ids)
    for a, b in zip(mlx_features(m, images, ids), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    config = hf_config_json(m.config)
    assert (config["text_config"]["hidden_act"], config["vision_config"]["hidden_act"]) == (
        "quick_gelu",
        "gelu",
    )


def test_open_clip_siglip2_exports_as_siglip_model(tmp_path):
    """open_clip's SigLIP 2 (timm's exact-GELU image tower, tanh-GELU text tower) imported by the
    open_clip path and exported --to hf loads as SiglipModel with open_clip's features."""
    pytest.importorskip("open_clip")
    pytest.importorskip("timm")
    from test_interop import open_clip_dir
    from test_interop_siglip_open_clip import CASES  # registers its tiny timm towers

    oc = open_clip_dir(tmp_path / "oc", CASES["siglip2"], seed=3).eval()
    convert.main(["--from", "open_clip", str(tmp_path / "oc"), "--out", str(tmp_path / "mlx")])
    export.main(["--checkpoint", str(tmp_path / "mlx"), "--to", "hf", "--out", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["SiglipModel"]
    assert (config["vision_config"]["hidden_act"], config["text_config"]["hidden_act"]) == (
        "gelu",
        "gelu_pytorch_tanh",
    )
    hf, info = transformers.SiglipModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    images, ids = inputs(load_mlx(tmp_path / "mlx").config, seed=4)
    theirs = torch_features(oc.encode_image, oc.encode_text, images, ids)
    for a, b in zip(hf_features(hf.eval(), images, ids), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    assert hf.logit_bias.item() == oc.logit_bias.item() and hf.logit_scale.item() == oc.logit_scale.item()


def test_export_refuses_an_image_projection_bias(tmp_path):
    """Neither CLIPModel nor SiglipModel has a bias on the image projection (open_clip's timm head,
    MobileCLIP2-L/14): such a model is refused by name rather than exported without it."""
    ckpt = save_mlx(mlx_model(dict(ODD, vision_proj_bias=True), seed=2), tmp_path / "ckpt")
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert "vision_proj_bias=True (needs False)" in str(e.value.code)
    assert not (tmp_path / "hf").exists()


def test_finetune_a_converted_siglip_from_the_cli(hf_siglip, tmp_path):
    """The fine-tune recipe: a converted SigLIP (its own SentencePiece tokenizer, preprocessing and
    architecture, taken with model.arch checkpoint) trains from the CLI with loss.type siglip and
    the image tower locked; the image tower stays bit-identical, the text tower and the bias move."""
    from safetensors.numpy import load_file

    from mlx_clip.train import main as train_main

    _, _, converted = hf_siglip
    run = tmp_path / "ft"
    train_main(
        ["--out", str(run), "--model.arch", "checkpoint", "--model.init_from", str(converted),
         "--loss.type", "siglip", "--optim.lock_image", "true", "--steps", "3", "--data.batch_size", "8",
         "--data.builtin_train_size", "64", "--data.builtin_val_size", "16", "--eval.every", "0",
         "--train.save_every", "0", "--optim.warmup_steps", "0", "--train.progress", "false"]
    )  # fmt: skip
    before = load_file(str(converted / "model.safetensors"))
    after = load_file(str(run / "checkpoints/step_3/model.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        assert np.array_equal(before[key], after[key]) == key.startswith("visual."), key
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["val_loss"])
    m = load_mlx(run / "checkpoints/step_3")
    assert (
        m.config.resize_mode == "squash"
        and load_tokenizer(run / "checkpoints/step_3").kind == "sentencepiece"
    )
