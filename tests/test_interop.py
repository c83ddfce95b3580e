"""Interop: Hugging Face transformers and open_clip checkpoints in (`python -m mlx_clip.convert`)
and out (`python -m mlx_clip.export`).

Every model is a tiny random one built offline, with every tensor perturbed so that no bias is zero
and no LayerNorm gain is one. Features are compared with the other library's own forward pass;
MLX takes images NHWC, torch NCHW.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import random_tokens
from mlx.utils import tree_map

import mlx_clip
from mlx_clip import convert, export
from mlx_clip.config import Config, ModelSection, config_to_yaml, load_config
from mlx_clip.models.config import ModelConfig, model_config
from mlx_clip.schema import ConfigError, to_dict
from mlx_clip.text.tokenizer import Tokenizer
from mlx_clip.text.vocab import openai_tokenizer, train_tokenizer

torch = pytest.importorskip("torch")

ATOL = 1e-4
# Sizes that are not powers of two: 36x36 images in 6x6 patches, widths 60 / 50, 5 heads, MLP ratio 3.
ODD = dict(
    embed_dim=24,
    image_size=36,
    patch_size=6,
    vision_width=60,
    vision_layers=2,
    vision_heads=5,
    context_length=13,
    vocab_size=600,
    text_width=50,
    text_layers=2,
    text_heads=5,
    mlp_ratio=3.0,
    activation="quick_gelu",
    layer_norm_eps=1e-5,
)
ODD_GELU = dict(ODD, activation="gelu", layer_norm_eps=1e-6, mlp_ratio=4.0, embed_dim=20)
# A SigLIP model: a learnable logit_bias beside logit_scale (the SigLIP paper's init, log 10 and -10).
ODD_SIGLIP = dict(ODD, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
CAPTIONS = [
    "A photo of a cat.",
    "two dogs  playing   in the SNOW!",
    "don't stop-believing: 1234 times",
    "a small red circle left of a blue square",
    "café naïve façade, über",
    "a long caption " + "with many words " * 12,
]


# ---------------------------------------------------------------------------
# helpers


def inputs(cfg: ModelConfig, seed: int = 0, batch: int = 3):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)  # NHWC
    return images, random_tokens(rng, batch, cfg.context_length, cfg.vocab_size)


def mlx_features(model, images, tokens):
    img = model.encode_image(mx.array(images), normalize=False)
    txt = model.encode_text(mx.array(tokens), normalize=False)
    return np.array(img), np.array(txt)


def torch_features(encode_image, encode_text, images, tokens):
    with torch.no_grad():
        img = encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))  # NHWC -> NCHW
        txt = encode_text(torch.from_numpy(tokens).long())
    # transformers 5 returns a model output from get_*_features; 4.x and open_clip the tensor.
    return [getattr(x, "pooler_output", x).numpy() for x in (img, txt)]


def perturb_torch(module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return module.eval()


def mlx_model(arch: dict, seed: int):
    m = mlx_clip.create_model(ModelConfig.from_dict(arch), seed=seed)
    m.update(tree_map(lambda p: p + 0.02 * mx.random.normal(p.shape), m.parameters()))
    mx.eval(m.parameters())
    return m


def save_mlx(model, directory: Path, tokenizer: Tokenizer | None = None) -> Path:
    """A checkpoint directory as training writes one (weights, resolved config, tokenizer)."""
    directory.mkdir(parents=True)
    mlx_clip.save_weights(model, directory / "model.safetensors")
    config = Config(model=ModelSection(arch="tiny", **to_dict(model.config)))
    (directory / "config.yaml").write_text(config_to_yaml(config))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_mlx(directory: Path):
    """What --model.init_from and mlx_clip.eval do: config.yaml -> model, strict weights."""
    cfg = load_config(directory / "config.yaml").model_config()
    return mlx_clip.load_weights(mlx_clip.create_model(cfg, seed=None), directory / "model.safetensors")


def assert_same_weights(dir_a: Path, dir_b: Path):
    a, b = mx.load(str(dir_a / "model.safetensors")), mx.load(str(dir_b / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(np.array(a[k]), np.array(b[k])), k


def assert_ids_match(ours: np.ndarray, theirs: np.ndarray, eot: int):
    """Identical up to and including EOT; after it we pad with 0, HF (by its convention) with EOT."""
    theirs = np.asarray(theirs)
    assert ours.shape == theirs.shape
    for row_ours, row_theirs in zip(ours, theirs, strict=True):
        end = int(np.argmax(row_ours == eot)) + 1
        assert row_ours[:end].tolist() == row_theirs[:end].tolist()
        assert (row_ours[end:] == 0).all() and (row_theirs[end:] == eot).all()


@pytest.fixture(scope="module")
def trained_tok():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small corpus pads the vocab with unused tokens
        return train_tokenizer(CAPTIONS * 3 + ["the quick brown fox jumps over the lazy dog"] * 5, 600)


# ---------------------------------------------------------------------------
# Hugging Face -> MLX


def hf_clip(arch: dict, eos_token_id: int, seed: int):
    """A transformers CLIPModel, configured with HF's own field names."""
    transformers = pytest.importorskip("transformers")
    text = dict(
        vocab_size=arch["vocab_size"],
        hidden_size=arch["text_width"],
        intermediate_size=int(arch["text_width"] * arch["mlp_ratio"]),
        num_hidden_layers=arch["text_layers"],
        num_attention_heads=arch["text_heads"],
        max_position_embeddings=arch["context_length"],
        hidden_act=arch["activation"],
        layer_norm_eps=arch["layer_norm_eps"],
        bos_token_id=arch["vocab_size"] - 2,
        eos_token_id=eos_token_id,
    )
    vision = dict(
        hidden_size=arch["vision_width"],
        intermediate_size=int(arch["vision_width"] * arch["mlp_ratio"]),
        num_hidden_layers=arch["vision_layers"],
        num_attention_heads=arch["vision_heads"],
        image_size=arch["image_size"],
        patch_size=arch["patch_size"],
        hidden_act=arch["activation"],
        layer_norm_eps=arch["layer_norm_eps"],
    )
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=arch["embed_dim"])
    torch.manual_seed(seed)
    return perturb_torch(transformers.CLIPModel(config), seed)


def save_hf(hf, directory: Path, safetensors: bool = True) -> Path:
    """save_pretrained; the pytorch_model.bin variant is what transformers 4 writes with
    safe_serialization=False (transformers 5 always writes safetensors): torch.save(state_dict)."""
    hf.save_pretrained(directory)
    if not safetensors:
        (directory / "model.safetensors").unlink()
        torch.save(hf.state_dict(), directory / "pytorch_model.bin")
    return directory


HF_CASES = {
    # name: (architecture, text eos_token_id (2 = HF's legacy argmax pooling), safetensors?)
    "quick_gelu": (ODD, 2, True),
    "gelu_eot_pooling": (ODD_GELU, ODD_GELU["vocab_size"] - 1, True),
    "gelu_pytorch_model_bin": (ODD_GELU, 2, False),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_convert_hf_features_match(tmp_path, case):
    arch, eos, safe = HF_CASES[case]
    hf = hf_clip(arch, eos, seed=1)
    save_hf(hf, tmp_path / "hf", safe)
    convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mlx")])

    m = load_mlx(tmp_path / "mlx")
    assert m.config == ModelConfig.from_dict(arch)
    images, tokens = inputs(m.config)
    ours = mlx_features(m, images, tokens)
    theirs = torch_features(hf.get_image_features, hf.get_text_features, images, tokens)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)


def test_convert_hf_with_openai_tokenizer(tmp_path):
    """A HF directory as transformers saves it (5.x: tokenizer.json only; 4.x: vocab.json + merges.txt
    too) with the OpenAI vocab: converted ids equal open_clip's, and HF's pipeline gives our features."""
    transformers = pytest.importorskip("transformers")
    open_clip = pytest.importorskip("open_clip")
    arch = dict(ODD, vocab_size=49408, context_length=20)
    hf = hf_clip(arch, 2, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    # The vocab as files, from open_clip's own tables; transformers then saves it its way.
    ref = open_clip.tokenizer.SimpleTokenizer(context_length=20)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.json").write_text(json.dumps(ref.encoder))
    merges = sorted(ref.bpe_ranks, key=ref.bpe_ranks.get)
    (tmp_path / "tok" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
    hf_tok = transformers.CLIPTokenizer.from_pretrained(
        tmp_path / "tok",
        bos_token="<start_of_text>",
        eos_token="<end_of_text>",
        unk_token="<end_of_text>",
        pad_token="<end_of_text>",
    )
    hf_tok.save_pretrained(tmp_path / "hf")
    convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mlx")])

    tok = Tokenizer.load(tmp_path / "mlx")
    assert tok.kind == "openai" and tok.vocab_size == 49408
    ids = tok(CAPTIONS, 20)
    np.testing.assert_array_equal(ids, ref(CAPTIONS).numpy())
    # HF's own tokenizer + model vs ours: same features.
    hf_ids = hf_tok(CAPTIONS, padding="max_length", max_length=20, truncation=True, return_tensors="np")
    m = load_mlx(tmp_path / "mlx")
    with torch.no_grad():
        theirs = hf.get_text_features(input_ids=torch.from_numpy(hf_ids["input_ids"]))
    theirs = getattr(theirs, "pooler_output", theirs).numpy()
    np.testing.assert_allclose(np.array(m.encode_text(mx.array(ids), normalize=False)), theirs, atol=ATOL)


# ---------------------------------------------------------------------------
# MLX -> Hugging Face -> MLX


def test_export_hf_round_trip(tmp_path, trained_tok):
    transformers = pytest.importorskip("transformers")
    m = mlx_model(ODD_GELU, seed=3)
    ckpt = save_mlx(m, tmp_path / "ckpt", trained_tok)
    export.main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")])

    hf, info = transformers.CLIPModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    images, tokens = inputs(m.config, seed=4)
    theirs = torch_features(hf.eval().get_image_features, hf.get_text_features, images, tokens)
    for a, b in zip(mlx_features(m, images, tokens), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)

    # The processor: our token ids (HF pads with EOT) and, on an S x S image, our eval transform.
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    ctx = m.config.context_length
    enc = processor(text=CAPTIONS, padding="max_length", max_length=ctx, truncation=True, return_tensors="np")
    ours = trained_tok(CAPTIONS, ctx)
    assert_ids_match(ours, enc["input_ids"], trained_tok.eot_token_id)
    with torch.no_grad():
        hf_txt = hf.get_text_features(input_ids=torch.from_numpy(enc["input_ids"]))
    np.testing.assert_allclose(
        np.array(m.encode_text(mx.array(ours), normalize=False)),
        getattr(hf_txt, "pooler_output", hf_txt).numpy(),
        atol=ATOL,
    )
    from PIL import Image

    from mlx_clip.data.transforms import eval_transform

    pixels = np.random.default_rng(5).integers(0, 256, (36, 36, 3), dtype=np.uint8)
    hf_pix = processor(images=Image.fromarray(pixels), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(hf_pix.transpose(1, 2, 0), eval_transform(36)(pixels), atol=1e-5)

    # And back: bit-exact weights, the same tokenizer ids.
    convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    assert_same_weights(ckpt, tmp_path / "back")
    np.testing.assert_array_equal(Tokenizer.load(tmp_path / "back")(CAPTIONS, ctx), ours)


@pytest.mark.parametrize("vocab", ["openai", "trained"])
def test_exported_hf_tokenizer_ids_equal_ours(tmp_path, vocab, trained_tok):
    transformers = pytest.importorskip("transformers")
    from mlx_clip.interop.hf import write_hf_tokenizer

    tok = openai_tokenizer() if vocab == "openai" else trained_tok
    write_hf_tokenizer(tok, tmp_path, context_length=77)
    hf_tok = transformers.CLIPTokenizerFast.from_pretrained(tmp_path)
    for ctx in (77, 10):  # 10 truncates: EOT stays last in both
        theirs = hf_tok(CAPTIONS, padding="max_length", max_length=ctx, truncation=True)["input_ids"]
        assert_ids_match(tok(CAPTIONS, ctx), theirs, tok.eot_token_id)
    assert hf_tok.bos_token_id == tok.sot_token_id and hf_tok.eos_token_id == tok.eot_token_id


# ---------------------------------------------------------------------------
# open_clip -> MLX -> open_clip


EPS6 = {"eps": 1e-6}
OC_CASES = {
    "quick_gelu": dict(
        embed_dim=24,
        quick_gelu=True,
        vision_cfg=dict(image_size=36, patch_size=6, width=60, layers=2, head_width=12, mlp_ratio=3.0),
        text_cfg=dict(context_length=13, vocab_size=600, width=50, heads=5, layers=2, mlp_ratio=3.0),
    ),
    "gelu_eps": dict(
        embed_dim=20,
        vision_cfg=dict(
            image_size=36, patch_size=6, width=60, layers=2, head_width=20, norm_kwargs={"eps": 1e-6}
        ),
        text_cfg=dict(
            context_length=11, vocab_size=600, width=50, heads=5, layers=1, norm_kwargs={"eps": 1e-6}
        ),
    ),
    # CustomTextCLIP nests the text tower under "text."
    "custom_text": dict(
        embed_dim=24,
        custom_text=True,
        vision_cfg=dict(image_size=36, patch_size=6, width=60, layers=1, head_width=12),
        text_cfg=dict(context_length=13, vocab_size=600, width=50, heads=5, layers=2),
    ),
    # SigLIP's logit_bias, with logit_scale and logit_bias of shape (1,) (nonscalar_logit_scale)
    "siglip_nonscalar": dict(
        embed_dim=24,
        quick_gelu=True,
        init_logit_scale=math.log(10.0),
        init_logit_bias=-10,
        nonscalar_logit_scale=True,
        vision_cfg=dict(image_size=36, patch_size=6, width=60, layers=1, head_width=12),
        text_cfg=dict(context_length=13, vocab_size=600, width=50, heads=5, layers=1),
    ),
}


def open_clip_dir(directory: Path, model_cfg: dict, seed: int):
    """An open_clip local-dir model (open_clip_config.json + open_clip_model.safetensors)."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    torch.manual_seed(seed)
    model = perturb_torch(open_clip.create_model(f"local-dir:{directory}"), seed)
    save_file(model.state_dict(), str(directory / "open_clip_model.safetensors"))
    return model


@pytest.mark.parametrize("case", OC_CASES)
def test_convert_open_clip_features_match(tmp_path, case):
    oc = open_clip_dir(tmp_path / "oc", OC_CASES[case], seed=6)
    convert.main(["--from", "open_clip", str(tmp_path / "oc"), "--out", str(tmp_path / "mlx")])
    m = load_mlx(tmp_path / "mlx")
    assert m.config.activation == ("quick_gelu" if OC_CASES[case].get("quick_gelu") else "gelu")
    images, tokens = inputs(m.config, seed=7)
    theirs = torch_features(oc.encode_image, oc.encode_text, images, tokens)
    for a, b in zip(mlx_features(m, images, tokens), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    # The scalars, bit for bit ((1,) under nonscalar_logit_scale -> ()), and the inits.
    assert m.logit_scale.shape == () and m.logit_scale.item() == oc.logit_scale.item()
    bias = OC_CASES[case].get("init_logit_bias")
    assert m.config.init_logit_bias == bias and m.config.init_logit_scale == OC_CASES[case].get(
        "init_logit_scale"
    )
    if bias is None:
        assert oc.logit_bias is None and "logit_bias" not in m.parameters()
    else:
        assert m.logit_bias.shape == () and m.logit_bias.item() == oc.logit_bias.item() != bias


def test_convert_open_clip_state_dict_with_arch(tmp_path):
    """A training checkpoint ({"epoch", "state_dict"} with DDP's "module." prefix) + --arch."""
    open_clip = pytest.importorskip("open_clip")
    from mlx_clip.interop.open_clip import open_clip_cfg

    torch.manual_seed(8)
    oc = perturb_torch(open_clip.model.CLIP(**open_clip_cfg(model_config("tiny"))), 8)
    state = {f"module.{k}": v for k, v in oc.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": state}, tmp_path / "epoch_3.pt")
    with pytest.raises(SystemExit, match="needs --arch"):
        convert.main(["--from", "open_clip", str(tmp_path / "epoch_3.pt"), "--out", str(tmp_path / "x")])
    convert.main(
        [
            "--from",
            "open_clip",
            str(tmp_path / "epoch_3.pt"),
            "--arch",
            "tiny",
            "--out",
            str(tmp_path / "mlx"),
        ]
    )
    m = load_mlx(tmp_path / "mlx")
    images, tokens = inputs(m.config, seed=9)
    theirs = torch_features(oc.encode_image, oc.encode_text, images, tokens)
    for a, b in zip(mlx_features(m, images, tokens), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)


def test_open_clip_arch_names():
    pytest.importorskip("open_clip")
    from mlx_clip.interop.open_clip import arch_config

    assert arch_config("ViT-B-32-quickgelu") == model_config("vit_b32")
    assert arch_config("ViT-B-16-quickgelu") == model_config("vit_b16")
    assert arch_config("ViT-L-14-quickgelu") == model_config("vit_l14")
    assert arch_config("ViT-B-32") == ModelConfig(**dict(to_dict(model_config("vit_b32")), activation="gelu"))
    with pytest.raises(ConfigError, match=r"vision_cfg.layers=.*ResNet"):
        arch_config("RN50")
    with pytest.raises(ConfigError, match="not an mlx_clip architecture"):
        arch_config("ViT-B-33")


def test_every_open_clip_config_maps_or_names_the_field():
    """Each JSON in the installed open_clip either maps onto ModelConfig or is refused by name."""
    open_clip = pytest.importorskip("open_clip")
    from mlx_clip.interop.open_clip import arch_config

    mapped, refused = [], []
    for name in open_clip.list_models():
        try:
            mapped.append(arch_config(name))
        except ConfigError as e:
            assert str(e).startswith(f"{name}: model_cfg."), e  # names the field at fault
            refused.append(name)
    assert len(mapped) > 10 and len(refused) > 10
    for name, field in [
        ("MobileCLIP2-S2", "vision_cfg.timm_model_name"),  # a conv (FastViT) timm tower
        ("RN50", "vision_cfg.layers"),  # ResNet tower
        ("coca_ViT-B-32", "multimodal_cfg"),  # CoCa
        ("ViT-L-14-CLIPA", "vision_cfg.no_ln_pre"),
        ("convnext_base", "vision_cfg.timm_model_name"),
    ]:
        if name in open_clip.list_models():
            with pytest.raises(ConfigError, match=rf"^{name}: model_cfg\.{field}"):
                arch_config(name)


@pytest.mark.parametrize("vocab", ["openai", "trained"])
def test_export_open_clip_round_trip(tmp_path, vocab, trained_tok):
    open_clip = pytest.importorskip("open_clip")
    arch, tok = (dict(ODD, vocab_size=49408), openai_tokenizer()) if vocab == "openai" else (ODD, trained_tok)
    m = mlx_model(arch, seed=10)
    ckpt = save_mlx(m, tmp_path / "ckpt", tok)
    out = tmp_path / "oc"
    export.main(["--checkpoint", str(ckpt), "--to", "open_clip", "--out", str(out)])

    oc = open_clip.create_model(f"local-dir:{out}")  # strict load_state_dict inside
    images, tokens = inputs(m.config, seed=11)
    theirs = torch_features(oc.eval().encode_image, oc.encode_text, images, tokens)
    for a, b in zip(mlx_features(m, images, tokens), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    # The documented manual recipe is strict too.
    from safetensors.torch import load_file

    model_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    open_clip.model.CLIP(**model_cfg).load_state_dict(load_file(out / "open_clip_model.safetensors"))

    ctx = m.config.context_length
    oc_ids = open_clip.get_tokenizer(f"local-dir:{out}")(CAPTIONS).numpy()
    if vocab == "openai":
        np.testing.assert_array_equal(oc_ids, tok(CAPTIONS, ctx))  # open_clip's own tokenizer, 0-padded
        assert not (out / "vocab.json").exists()
    else:
        assert_ids_match(tok(CAPTIONS, ctx), oc_ids, tok.eot_token_id)

    convert.main(["--from", "open_clip", str(out), "--out", str(tmp_path / "back")])
    assert_same_weights(ckpt, tmp_path / "back")
    np.testing.assert_array_equal(Tokenizer.load(tmp_path / "back")(CAPTIONS, ctx), tok(CAPTIONS, ctx))


def siglip_logits(image_features, text_features, scale, bias):
    """The pairwise logits a SigLIP model is trained on (numpy, float64): scale * cos + bias."""
    a, b = (np.asarray(x, np.float64) for x in (image_features, text_features))
    a, b = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (a, b))
    return scale * a @ b.T + bias


def test_export_open_clip_round_trip_with_logit_bias(tmp_path, trained_tok):
    """MLX (SigLIP) -> open_clip -> MLX: open_clip builds the bias from model_cfg, loads ours strictly and
    gives our pairwise logits; back, every weight (logit_bias too) and the inits are bit-exact."""
    open_clip = pytest.importorskip("open_clip")
    m = mlx_model(ODD_SIGLIP, seed=20)  # perturbed: the bias is a trained value, not -10
    ckpt = save_mlx(m, tmp_path / "ckpt", trained_tok)
    out = tmp_path / "oc"
    export.main(["--checkpoint", str(ckpt), "--to", "open_clip", "--out", str(out)])

    model_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    assert model_cfg["init_logit_bias"] == -10.0 and model_cfg["init_logit_scale"] == math.log(10.0)
    oc = open_clip.create_model(f"local-dir:{out}").eval()  # strict load_state_dict inside
    assert oc.logit_bias.shape == () and oc.logit_bias.item() == m.logit_bias.item() != -10.0
    assert oc.logit_scale.item() == m.logit_scale.item()
    images, tokens = inputs(m.config, seed=21, batch=4)
    with torch.no_grad():  # open_clip's own forward returns (image, text, exp(scale), bias) for SigLIP
        img, txt, scale, bias = oc(
            torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(tokens).long()
        )
    ours = siglip_logits(
        *mlx_features(m, images, tokens), math.exp(m.logit_scale.item()), m.logit_bias.item()
    )
    np.testing.assert_allclose(siglip_logits(img, txt, scale.item(), bias.item()), ours, atol=1e-4)

    convert.main(["--from", "open_clip", str(out), "--out", str(tmp_path / "back")])
    assert_same_weights(ckpt, tmp_path / "back")
    assert load_mlx(tmp_path / "back").config == m.config
    assert load_config(tmp_path / "back" / "config.yaml").loss.type == "siglip"  # the objective it had


def test_convert_open_clip_state_dict_with_logit_bias(tmp_path):
    """A SigLIP state dict whose config has no init_logit_bias (open_clip_train --siglip passes it as an
    argument) is read as SigLIP with open_clip_train's init; the bias is the trained one."""
    open_clip = pytest.importorskip("open_clip")
    from mlx_clip.interop.open_clip import open_clip_cfg

    torch.manual_seed(22)
    oc = perturb_torch(open_clip.model.CLIP(**open_clip_cfg(model_config("tiny")), init_logit_bias=-3.0), 22)
    torch.save(oc.state_dict(), tmp_path / "siglip.pt")
    argv = [
        "--from",
        "open_clip",
        str(tmp_path / "siglip.pt"),
        "--arch",
        "tiny",
        "--out",
        str(tmp_path / "mlx"),
    ]
    convert.main(argv)
    m = load_mlx(tmp_path / "mlx")
    assert (m.config.init_logit_scale, m.config.init_logit_bias) == (math.log(10.0), -10.0)
    assert m.logit_bias.item() == oc.logit_bias.item() and m.logit_scale.item() == oc.logit_scale.item()


def test_export_hf_refuses_logit_bias(tmp_path):
    """transformers' CLIPModel has no logit_bias: the export stops, says why and where to go instead,
    and writes nothing (it does not drop the bias)."""
    m = mlx_model(ODD_SIGLIP, seed=23)
    ckpt = save_mlx(m, tmp_path / "ckpt")
    with pytest.raises(SystemExit) as e:
        export.main(["--checkpoint", str(ckpt), "--to", "hf", "--out", str(tmp_path / "hf")])
    msg = str(e.value.code)
    assert msg.startswith("error: logit_bias: ") and "CLIPModel has no such parameter" in msg
    assert "--to open_clip" in msg and "--to torch_ref" in msg and f"{m.logit_bias.item():g}" in msg
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------------------
# torch_ref, run directories


def test_export_torch_ref_from_run_dir(tmp_path, trained_tok):
    import torch_ref

    m = mlx_model(ODD, seed=12)
    run = tmp_path / "run"
    save_mlx(m, run / "checkpoints" / "step_7", trained_tok)
    os.symlink("step_7", run / "checkpoints" / "latest")
    export.main(["--checkpoint", str(run), "--to", "torch_ref", "--out", str(tmp_path / "tr")])

    t = torch_ref.create_model(str(tmp_path / "tr" / "model.yaml"), device="cpu")
    torch_ref.load_weights(t, tmp_path / "tr" / "model.safetensors")
    images, tokens = inputs(m.config, seed=13)
    theirs = torch_features(t.eval().visual, t.text, images, tokens)
    for a, b in zip(mlx_features(m, images, tokens), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert_same_weights(run / "checkpoints" / "step_7", tmp_path / "tr")
    assert Tokenizer.load(tmp_path / "tr").vocab_size == 600
    with pytest.raises(SystemExit, match="not empty"):
        export.main(["--checkpoint", str(run), "--to", "torch_ref", "--out", str(tmp_path / "tr")])


def test_export_torch_ref_with_logit_bias(tmp_path):
    """model.yaml carries init_logit_scale / init_logit_bias: torch_ref rebuilds the bias and loads it
    strictly; torch_ref's save is the same canonical file, which MLX loads back bit-exact."""
    import torch_ref

    m = mlx_model(ODD_SIGLIP, seed=24)
    ckpt = save_mlx(m, tmp_path / "ckpt")
    export.main(["--checkpoint", str(ckpt), "--to", "torch_ref", "--out", str(tmp_path / "tr")])

    t = torch_ref.create_model(str(tmp_path / "tr" / "model.yaml"), device="cpu")
    assert t.config == m.config and t.logit_bias.item() == -10.0  # init, before loading
    torch_ref.load_weights(t, tmp_path / "tr" / "model.safetensors")
    assert t.logit_bias.item() == m.logit_bias.item() != -10.0
    images, tokens = inputs(m.config, seed=25)
    img, txt = torch_features(t.eval().visual, t.text, images, tokens)
    ours = siglip_logits(
        *mlx_features(m, images, tokens), math.exp(m.logit_scale.item()), m.logit_bias.item()
    )
    theirs = siglip_logits(img, txt, math.exp(t.logit_scale.item()), t.logit_bias.item())
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    torch_ref.save_weights(t, tmp_path / "tr" / "again.safetensors")
    back = load_mlx(ckpt)  # config.yaml -> a model with the bias
    mlx_clip.load_weights(back, tmp_path / "tr" / "again.safetensors")
    assert back.logit_bias.item() == m.logit_bias.item()


# ---------------------------------------------------------------------------
# errors


def test_foreign_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = hf_clip(ODD, 2, seed=14)
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    save_file(
        dict(state, **{"vision_model.extra.weight": torch.zeros(2)}), weights, metadata={"format": "pt"}
    )
    with pytest.raises(SystemExit, match="unexpected key 'vision_model.extra.weight'"):
        convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "a")])
    del state["text_projection.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit, match="missing key 'text_projection.weight'"):
        convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b")])

    open_clip_dir(tmp_path / "oc", OC_CASES["quick_gelu"], seed=15)
    weights = tmp_path / "oc" / "open_clip_model.safetensors"
    state = load_file(weights)
    save_file(dict(state, **{"visual.bogus": torch.zeros(2)}), weights)
    with pytest.raises(SystemExit, match="unexpected key 'visual.bogus'"):
        convert.main(["--from", "open_clip", str(tmp_path / "oc"), "--out", str(tmp_path / "c")])
    del state["visual.proj"]
    save_file(state, weights)
    with pytest.raises(SystemExit, match="missing key 'visual.proj'"):
        convert.main(["--from", "open_clip", str(tmp_path / "oc"), "--out", str(tmp_path / "d")])
    assert not any((tmp_path / n).exists() for n in "abcd")  # nothing half-written


def test_unsupported_configs_name_the_field(tmp_path):
    from mlx_clip.interop.hf import hf_config_json, hf_model_config
    from mlx_clip.interop.open_clip import open_clip_cfg, open_clip_model_config

    cfg = ModelConfig.from_dict(ODD)
    hf = hf_config_json(cfg)
    assert hf_model_config(hf) == cfg
    bad = json.loads(json.dumps(hf))
    bad["text_config"]["hidden_act"] = "gelu_new"
    with pytest.raises(ConfigError, match=r"text_config.hidden_act='gelu_new'"):
        hf_model_config(bad)
    bad = json.loads(json.dumps(hf))
    bad["text_config"]["eos_token_id"] = 7
    with pytest.raises(ConfigError, match=r"text_config.eos_token_id=7"):
        hf_model_config(bad)
    bad = json.loads(json.dumps(hf))
    bad["vision_config"]["intermediate_size"] = 100  # not the text tower's ratio: a per-tower width
    assert hf_model_config(bad) == ModelConfig.from_dict(
        dict(ODD, mlp_ratio=4.0, vision_mlp_dim=100, text_mlp_dim=150)
    )

    oc = open_clip_cfg(cfg)
    assert open_clip_model_config(oc) == cfg
    for section, key, value in [
        ("text_cfg", "pool_type", "last"),
        ("text_cfg", "proj_type", "mlp"),
        ("vision_cfg", "ls_init_value", 1e-5),
        ("vision_cfg", "attentional_pool", True),
        ("vision_cfg", "no_ln_pre", True),
        ("vision_cfg", "frobnicate", 1),
    ]:
        bad = json.loads(json.dumps(oc))
        bad[section][key] = value
        with pytest.raises(ConfigError, match=rf"model_cfg.{section}.{key}"):
            open_clip_model_config(bad)
    # SigLIP's inits map both ways; open_clip's defaults (log(1/0.07), no bias) are ours (None).
    siglip = ModelConfig.from_dict(ODD_SIGLIP)
    assert open_clip_cfg(siglip)["init_logit_bias"] == -10.0
    assert open_clip_cfg(siglip)["init_logit_scale"] == math.log(10.0)
    assert open_clip_model_config(open_clip_cfg(siglip)) == siglip
    assert "init_logit_bias" not in oc and "init_logit_scale" not in oc
    with pytest.raises(ConfigError, match=r"model_cfg.init_logit_bias='-10': expected a number"):
        open_clip_model_config(dict(oc, init_logit_bias="-10"))

    # Through the CLI: the error names the file and the field, and nothing is written.
    src = tmp_path / "oc"
    src.mkdir()
    bad = json.loads(json.dumps(oc))
    bad["text_cfg"]["pool_type"] = "first"
    (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": bad}))
    (src / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"open_clip_config.json: model_cfg.text_cfg.pool_type='first'"):
        convert.main(["--from", "open_clip", str(src), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


class _Evil:
    """Unpickling this calls open(marker, "w"): stands for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_are_read_with_weights_only(tmp_path):
    hf = hf_clip(ODD, 2, seed=16)
    save_hf(hf, tmp_path / "hf", safetensors=False)
    weights = tmp_path / "hf" / "pytorch_model.bin"
    marker = tmp_path / "pwned"
    state = torch.load(weights, weights_only=True)
    torch.save(dict(state, evil=_Evil(marker)), weights)

    with pytest.raises(
        SystemExit, match=r"pytorch_model.bin: refused to load: torch.load\(weights_only=True\)"
    ):
        convert.main(["--from", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "mlx")])
    assert not marker.exists()
    # The file really is hostile: a plain unpickle runs its payload.
    torch.load(weights, weights_only=False)
    assert marker.exists()
