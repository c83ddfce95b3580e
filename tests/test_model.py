"""The public model API, shapes and invariants of mlx_clip.models.model."""

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import ODD_ARCH, random_tokens
from mlx.utils import tree_flatten

import mlx_clip
from mlx_clip.models.config import ModelConfig, available_models, model_config
from mlx_clip.models.model import LOGIT_SCALE_MAX

ODD = ModelConfig.from_dict(ODD_ARCH)


def n_params(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def test_public_api_shapes():
    m = mlx_clip.create_model("tiny")
    cfg = m.config
    rng = np.random.default_rng(0)
    images = mx.array(rng.standard_normal((3, cfg.image_size, cfg.image_size, 3)).astype(np.float32))
    tokens = mx.array(random_tokens(rng, 3, cfg.context_length, cfg.vocab_size))
    img, txt, scale = m(images, tokens)
    assert img.shape == (3, cfg.embed_dim) and txt.shape == (3, cfg.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(np.array(img), axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.array(txt), axis=-1), 1.0, rtol=1e-5)
    assert math.isclose(float(scale), 1 / 0.07, rel_tol=1e-5)
    raw = m.encode_image(images, normalize=False)
    assert not np.allclose(np.linalg.norm(np.array(raw), axis=-1), 1.0)
    assert m.encode_text(tokens).dtype == mx.float32


def test_tiny_is_a_few_million_parameters():
    assert 1e6 < n_params(mlx_clip.create_model("tiny")) < 8e6


def test_logit_scale_is_clamped_at_100():
    m = mlx_clip.create_model(ODD)
    m.logit_scale = mx.array(10.0)
    cfg = m.config
    rng = np.random.default_rng(0)
    _, _, scale = m(
        mx.array(rng.standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)),
        mx.array(random_tokens(rng, 2, cfg.context_length, cfg.vocab_size)),
    )
    assert math.isclose(float(scale), 100.0, rel_tol=1e-5)
    assert math.isclose(LOGIT_SCALE_MAX, math.log(100))


def test_text_is_causal_and_pooled_at_eot():
    """Tokens after the EOT cannot change the text feature; tokens before it do."""
    m = mlx_clip.create_model(ODD)
    rng = np.random.default_rng(0)
    tokens = random_tokens(rng, 1, 13, 301)
    eot = int(np.argmax(tokens[0]))
    assert eot < 12
    base = np.array(m.encode_text(mx.array(tokens)))
    after = tokens.copy()
    after[0, eot + 1 :] = 7
    np.testing.assert_allclose(np.array(m.encode_text(mx.array(after))), base, atol=1e-6)
    before = tokens.copy()
    before[0, 0] = 5
    assert not np.allclose(np.array(m.encode_text(mx.array(before))), base, atol=1e-4)


def test_patch_embed_equals_strided_conv():
    """The reshape+matmul patch embedding is exactly a stride-p convolution."""
    m = mlx_clip.create_model(ODD)
    pe = m.visual.patch_embed
    x = mx.random.normal((2, 48, 48, 3))
    conv = mx.conv2d(x, pe.weight, stride=pe.patch_size)  # (B, 6, 6, W)
    np.testing.assert_allclose(np.array(pe(x)), np.array(conv.reshape(2, 36, -1)), atol=1e-5)


def test_same_seed_same_weights_and_different_seed_differs():
    a, b, c = (dict(tree_flatten(mlx_clip.create_model("tiny", seed=s).parameters())) for s in (0, 0, 1))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert not np.array_equal(np.array(a["visual.proj.weight"]), np.array(c["visual.proj.weight"]))


@pytest.mark.parametrize(
    "name,expected",
    [
        # (embed, image, patch, v_width, v_layers, v_heads, ctx, vocab, t_width, t_heads, t_layers)
        ("vit_b32", (512, 224, 32, 768, 12, 12, 77, 49408, 512, 8, 12)),
        ("vit_b16", (512, 224, 16, 768, 12, 12, 77, 49408, 512, 8, 12)),
        ("vit_l14", (768, 224, 14, 1024, 24, 16, 77, 49408, 768, 12, 12)),
        ("vit_s16", (384, 224, 16, 384, 12, 6, 77, 49408, 384, 6, 12)),
    ],
)
def test_named_architectures_have_published_shapes(name, expected):
    c = model_config(name)
    got = (
        c.embed_dim,
        c.image_size,
        c.patch_size,
        c.vision_width,
        c.vision_layers,
        c.vision_heads,
        c.context_length,
        c.vocab_size,
        c.text_width,
        c.text_heads,
        c.text_layers,
    )
    assert got == expected


def test_vit_b32_parameter_count_matches_openai():
    # OpenAI ViT-B/32 has 151,277,313 parameters (open_clip reports the same).
    assert n_params(mlx_clip.create_model("vit_b32")) == 151_277_313


def test_all_architectures_listed():
    assert {"tiny", "vit_s16", "vit_b32", "vit_b16", "vit_l14"} <= set(available_models())
