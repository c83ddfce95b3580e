"""The tower options (CLIP, SigLIP-like and mixed families): mlx_clip vs torch_ref parity, exact
parameter counts, checkpoint round trips, validation, and the named SigLIP configs."""

import json
import math
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import GRID5_ARCH, assert_grads_match_torch
from mlx.utils import tree_flatten, tree_map

import mlx_clip
from mlx_clip.models.config import ModelConfig, model_config
from mlx_clip.models.model import CLIP, encode_pair
from mlx_clip.schema import ConfigError
from mlx_clip.training import loss as mlx_loss
from mlx_clip.training.loss import siglip_loss

torch = pytest.importorskip("torch")
import torch_ref  # noqa: E402
from torch_ref import loss as torch_loss  # noqa: E402

# Tiny sizes that are not powers of two: 30 px images in 6 px patches (a 5 x 5 grid).
BASE = ModelConfig(**GRID5_ARCH)
FAMILIES = {
    "clip": BASE,
    "siglip": replace(
        BASE,
        image_size=33,  # a remainder of 3 px, as SigLIP's 384 px / 14 px
        vision_pool="map",
        patch_bias=True,
        vision_pre_norm=False,
        vision_proj=False,
        vision_mlp_dim=172,
        text_causal=False,
        text_pool="last",
        text_proj="head",
        text_mlp_dim=150,
        activation="gelu_tanh",
        layer_norm_eps=1e-6,
        init_logit_scale=math.log(10),
        init_logit_bias=-10.0,
    ),
    "mixed": replace(
        BASE,
        embed_dim=40,
        vision_mlp_dim=70,
        text_mlp_dim=130,
        text_proj="none",
        vision_pool="map",
        activation="quick_gelu",
    ),
    "bidirectional_first": replace(
        BASE, text_causal=False, text_pool="first", patch_bias=True, text_proj="head"
    ),
    # open_clip's mixes: MobileCLIP2-L/14's biased image projection, SigLIP 2's per-tower GELUs
    "per_tower": replace(
        BASE,
        vision_proj_bias=True,
        text_causal=False,
        vision_activation="gelu",
        text_activation="gelu_tanh",
        activation="quick_gelu",
    ),
}


def paired(cfg, tmp_path):
    """An MLX and a torch_ref model with the same weights, through the canonical safetensors file."""
    m = mlx_clip.create_model(cfg, seed=1)
    # non-zero biases and LayerNorm shifts, so that every parameter matters in the comparison
    m.update(tree_map(lambda v: v + 0.02 * mx.random.normal(v.shape) if v.ndim else v, m.parameters()))
    path = tmp_path / "w.safetensors"
    mlx_clip.save_weights(m, path)
    t = torch_ref.create_model(cfg, seed=2, device="cpu")
    torch_ref.load_weights(t, path)
    return m, t, path


def batch(cfg, n=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    tokens = rng.integers(1, cfg.vocab_size, (n, cfg.context_length)).astype(np.int32)
    return images, tokens


def to_torch(images, tokens):
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(tokens).long()


def losses(lib, model, images, tokens):
    """CLIP's and SigLIP's loss of the same forward pass (a fixed bias where the model has none)."""
    image_features, text_features, scale = model(images, tokens)
    bias = getattr(model, "logit_bias", -10.0)
    return lib.clip_loss(image_features, text_features, scale) + lib.siglip_loss(
        image_features, text_features, scale, bias
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_features_loss_and_gradients_match_torch_ref(family, tmp_path):
    cfg = FAMILIES[family]
    m, t, _ = paired(cfg, tmp_path)
    images, tokens = batch(cfg)
    ti, tt = to_torch(images, tokens)
    for mf, tf in (
        (m.encode_image(mx.array(images), normalize=False), t.encode_image(ti, normalize=False)),
        (m.encode_text(mx.array(tokens), normalize=False), t.encode_text(tt, normalize=False)),
    ):
        assert mf.shape == (5, cfg.embed_dim)
        np.testing.assert_allclose(np.array(mf), tf.detach().numpy(), atol=1e-5, rtol=1e-5)

    loss, grads = nn.value_and_grad(m, lambda model, x, y: losses(mlx_loss, model, x, y))(
        m, mx.array(images), mx.array(tokens)
    )
    tloss = losses(torch_loss, t, ti, tt)
    tloss.backward()
    np.testing.assert_allclose(float(loss), tloss.item(), rtol=1e-5, atol=1e-5)
    assert_grads_match_torch(grads, t)


def test_siglip_family_keys():
    keys = {k for k, _ in tree_flatten(CLIP(FAMILIES["siglip"]).parameters())}
    assert {
        "visual.patch_embed.bias",
        "visual.attn_pool.probe",
        "visual.attn_pool.attn.in_proj.weight",
        "visual.attn_pool.attn.out_proj.bias",
        "visual.attn_pool.norm.weight",
        "visual.attn_pool.mlp.c_fc.weight",
        "text.head.weight",
        "text.head.bias",
        "logit_bias",
    } <= keys
    assert not {k for k in keys if k.startswith(("visual.class_embedding", "visual.ln_pre", "visual.proj"))}
    assert "text.text_projection.weight" not in keys
    torch_keys = set(torch_ref.CLIP(FAMILIES["siglip"]).state_dict())
    assert torch_keys == keys


@pytest.mark.parametrize("family", FAMILIES)
def test_num_parameters_is_the_real_count(family):
    cfg = FAMILIES[family]
    assert cfg.num_parameters == sum(v.size for _, v in tree_flatten(CLIP(cfg).parameters()))
    assert cfg.num_parameters == sum(p.numel() for p in torch_ref.CLIP(cfg).parameters())


def test_checkpoint_records_the_options_and_rebuilds_the_model(tmp_path):
    cfg = FAMILIES["siglip"]
    m, _, path = paired(cfg, tmp_path)
    _, meta = mx.load(str(path), return_metadata=True)
    assert ModelConfig.from_dict(json.loads(meta["config"])) == cfg
    again = mlx_clip.load_weights(CLIP(cfg), path)
    images, tokens = batch(cfg, n=2)
    assert mx.array_equal(again.encode_image(mx.array(images)), m.encode_image(mx.array(images))).item()


def test_grad_checkpointing_and_bf16_run_the_options():
    cfg = FAMILIES["siglip"]
    m = mlx_clip.create_model(cfg, seed=0)
    images, tokens = (mx.array(a) for a in batch(cfg, n=3))

    def loss_fn(model):
        return siglip_loss(*encode_pair(model, images, tokens), mx.exp(model.logit_scale), model.logit_bias)

    plain = dict(tree_flatten(nn.value_and_grad(m, loss_fn)(m)[1]))
    m.set_grad_checkpointing(True)
    ckpt = dict(tree_flatten(nn.value_and_grad(m, loss_fn)(m)[1]))
    for k in plain:
        np.testing.assert_allclose(np.array(ckpt[k]), np.array(plain[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    image16, text16 = encode_pair(m, images, tokens, dtype=mx.bfloat16)
    image32, text32 = encode_pair(m, images, tokens)
    assert image16.dtype == mx.float32 and float(mx.abs(image16 - image32).max()) < 0.05
    assert float(mx.abs(text16 - text32).max()) < 0.05


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(vision_proj=False, vision_width=45), r"model.vision_proj is false.*vision_width=45 must equal"),
        (dict(text_proj="none"), r"model.text_proj is 'none'.*text_width=40 must equal model.embed_dim=48"),
        (dict(text_proj="linear"), r"model.text_proj.*proj.*head.*none"),
        (dict(vision_pool="avg"), r"model.vision_pool.*cls.*map"),
        (dict(text_pool="eot"), r"model.text_pool.*argmax.*last.*first"),
        (dict(activation="gelu_new"), r"model.activation.*gelu_tanh"),
        (dict(vision_mlp_dim=0), r"model.vision_mlp_dim must be in \[1, 64 \* vision_width"),
        (dict(text_mlp_dim=40 * 65), r"model.text_mlp_dim must be in"),
        (dict(text_causal="no"), r"model.text_causal"),
        (dict(image_size=32), r"model.image_size=32 is not divisible by model.patch_size=6"),
        (dict(vision_proj_bias=True, vision_proj=False, vision_width=48), r"vision_proj_bias needs"),
        (dict(text_activation="relu"), r"model.text_activation.*gelu_tanh.*null"),
    ],
)
def test_validation_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        replace(BASE, **change).validate()


def test_map_pooling_may_leave_a_pixel_remainder():
    replace(BASE, vision_pool="map", image_size=32).validate()  # as SigLIP's 384 px / 14 px
    with pytest.raises(ConfigError, match="image_size=4 is not divisible"):
        replace(BASE, vision_pool="map", image_size=4).validate()


# Parameter counts of HF transformers' SiglipModel with the same shapes, measured once (transformers
# 5.24.0, SiglipModel built on the meta device; google/siglip-base-patch16-224 is published as 203M
# parameters, google/siglip-so400m-patch14-384 as 878M).
HF_COUNTS = {"siglip_b16_224": 203_155_970, "siglip_so400m14_384": 877_960_498}


@pytest.mark.parametrize(
    "name", ["siglip_b16_224", "siglip_b16_256", "siglip_so400m14_384", "siglip2_b16_256"]
)
def test_named_siglip_configs(name):
    cfg = model_config(name)
    assert (cfg.vision_pool, cfg.text_pool, cfg.text_proj, cfg.activation) == (
        "map",
        "last",
        "head",
        "gelu_tanh",
    )
    assert not cfg.text_causal and not cfg.vision_proj and cfg.vision_width == cfg.embed_dim
    assert cfg.context_length == 64 and cfg.vocab_size == (256000 if name.startswith("siglip2") else 32000)
    assert cfg.layer_norm_eps == 1e-6 and cfg.init_logit_bias == -10.0
    assert cfg.init_logit_scale == pytest.approx(math.log(10))
    # An unevaluated MLX model's parameters are lazy: counting them allocates nothing.
    assert cfg.num_parameters == sum(v.size for _, v in tree_flatten(CLIP(cfg).parameters()))
    if name in HF_COUNTS:
        assert cfg.num_parameters == HF_COUNTS[name]


def test_so400m_has_its_own_mlp_width():
    cfg = model_config("siglip_so400m14_384")
    assert cfg.mlp_hidden("vision") == cfg.mlp_hidden("text") == 4304 and cfg.num_patches == 27 * 27


def test_pooling_head_and_text_head_unlock_with_the_last_blocks():
    """LiT-style partial locking counts SigLIP's attention pool and text head as the towers' heads."""
    from mlx_clip.config import OptimConfig
    from mlx_clip.training.optim_rules import is_locked

    cfg = FAMILIES["siglip"]
    opt = OptimConfig(
        lock_image=True, lock_image_unlocked_layers=1, lock_text=True, lock_text_unlocked_layers=1
    )
    assert not is_locked("visual.attn_pool.probe", opt, cfg) and not is_locked("text.head.bias", opt, cfg)
    assert is_locked("visual.patch_embed.bias", opt, cfg) and is_locked(
        "text.token_embedding.weight", opt, cfg
    )


def test_fine_tuning_at_another_size_resamples_positions_without_a_class_token(tmp_path):
    from mlx_clip.interop.layouts import resize_positional_embedding
    from mlx_clip.models.weights import load_init_weights

    m, _, path = paired(FAMILIES["siglip"], tmp_path)  # a 5 x 5 grid
    bigger = load_init_weights(CLIP(replace(FAMILIES["siglip"], image_size=45)), path)  # 7 x 7
    want = resize_positional_embedding(np.array(m.visual.positional_embedding), 7, class_token=False)
    assert want.shape == (49, 48)
    np.testing.assert_allclose(np.array(bigger.visual.positional_embedding), want, atol=1e-6)
