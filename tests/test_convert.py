"""Weight exchange: canonical files across frameworks, the HF and open_clip key mappings (strict loading:
tests/test_checkpoint.py)."""

import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import ODD_ARCH, random_tokens
from mlx.utils import tree_flatten

import mlx_clip
from mlx_clip.config import load_config
from mlx_clip.interop.hf_config import hf_config_kwargs
from mlx_clip.interop.layouts import (
    WeightError,
    canonical_to_hf,
    canonical_to_open_clip,
    hf_to_canonical,
    open_clip_to_canonical,
)

torch = pytest.importorskip("torch")
import torch_ref  # noqa: E402

# SigLIP: a learnable scalar logit_bias beside logit_scale.
SIGLIP_ARCH = dict(ODD_ARCH, init_logit_scale=math.log(10.0), init_logit_bias=-10.0)


def perturbed(arch, seed):
    """A model whose every tensor, the logit scalars included, differs from its init."""
    m = mlx_clip.create_model(arch, seed=seed)
    m.update({k: v + 0.1 for k, v in m.parameters().items() if k.startswith("logit_")})
    return m


@pytest.mark.parametrize("arch", [ODD_ARCH, SIGLIP_ARCH], ids=["clip", "siglip"])
def test_mlx_torch_mlx_round_trip_is_bit_exact(tmp_path, arch):
    cfg = mlx_clip.ModelConfig.from_dict(arch)
    m = perturbed(cfg, seed=3)
    mlx_clip.save_weights(m, tmp_path / "a.safetensors")
    t = torch_ref.create_model(cfg, seed=4, device="cpu")
    torch_ref.load_weights(t, tmp_path / "a.safetensors")
    assert hasattr(t, "logit_bias") == ("init_logit_bias" in arch)
    torch_ref.save_weights(t, tmp_path / "b.safetensors")
    m2 = mlx_clip.create_model(cfg, seed=5)
    mlx_clip.load_weights(m2, tmp_path / "b.safetensors")
    a, b = dict(tree_flatten(m.parameters())), dict(tree_flatten(m2.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    # The two files are the same canonical tensors, key for key.
    fa, fb = mx.load(str(tmp_path / "a.safetensors")), mx.load(str(tmp_path / "b.safetensors"))
    assert fa.keys() == fb.keys()
    assert all(np.array_equal(np.array(fa[k]), np.array(fb[k])) for k in fa)


def test_torch_layout_differs_only_in_conv(tmp_path):
    m = mlx_clip.create_model("tiny")
    mlx_clip.save_weights(m, tmp_path / "w.safetensors")
    t = torch_ref.load_weights(torch_ref.create_model("tiny", device="cpu"), tmp_path / "w.safetensors")
    mw = dict(tree_flatten(m.parameters()))
    for k, v in t.state_dict().items():
        if k == "visual.patch_embed.weight":
            assert tuple(v.shape) == (192, 3, 8, 8) and mw[k].shape == (192, 8, 8, 3)
        else:
            assert tuple(v.shape) == mw[k].shape, k


# ---------------------------------------------------------------------------
# An implementation we did not write: Hugging Face transformers CLIPModel.

HF_ARCHS = {
    "quick_gelu": dict(ODD_ARCH, activation="quick_gelu"),
    "gelu": ODD_ARCH,
    "gelu_odd": dict(
        ODD_ARCH,
        image_size=36,
        patch_size=6,
        vision_width=60,
        vision_heads=5,
        text_width=50,
        text_heads=5,
        embed_dim=24,
        mlp_ratio=3.0,
    ),
}


def hf_model(cfg):
    transformers = pytest.importorskip("transformers")
    kw = hf_config_kwargs(cfg)
    config = transformers.CLIPConfig(
        text_config=kw["text_config"], vision_config=kw["vision_config"], projection_dim=kw["projection_dim"]
    )
    return transformers.CLIPModel(config).eval()


@pytest.mark.parametrize("name", HF_ARCHS)
def test_hf_clip_features_match(name):
    m = mlx_clip.create_model(mlx_clip.ModelConfig.from_dict(HF_ARCHS[name]), seed=7)
    cfg = m.config
    canonical = {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(m.parameters())}
    hf = hf_model(cfg)
    hf.load_state_dict(canonical_to_hf(canonical, cfg), strict=True)

    rng = np.random.default_rng(1)
    images = rng.standard_normal((4, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    tokens = random_tokens(rng, 4, cfg.context_length, cfg.vocab_size)
    with torch.no_grad():
        pix = torch.from_numpy(images).permute(0, 3, 1, 2)
        ids = torch.from_numpy(tokens).long()
        hf_img = hf.get_image_features(pixel_values=pix)
        hf_txt = hf.get_text_features(input_ids=ids)
        # transformers 5 returns a model output here; 4.x returns the tensor.
        hf_img = getattr(hf_img, "pooler_output", hf_img)
        hf_txt = getattr(hf_txt, "pooler_output", hf_txt)
    ours_img = np.array(m.encode_image(mx.array(images), normalize=False))
    ours_txt = np.array(m.encode_text(mx.array(tokens), normalize=False))
    np.testing.assert_allclose(ours_img, hf_img.numpy(), atol=1e-4)
    np.testing.assert_allclose(ours_txt, hf_txt.numpy(), atol=1e-4)

    # And back: HF weights -> canonical reproduces ours bit for bit.
    back = hf_to_canonical(hf.state_dict(), cfg, concat=torch.cat)
    for k, v in canonical.items():
        assert torch.equal(back[k], v), k


def test_hf_mapping_rejects_foreign_keys():
    cfg = mlx_clip.ModelConfig.from_dict(ODD_ARCH)
    m = mlx_clip.create_model(cfg)
    hf_state = canonical_to_hf({k: np.array(v) for k, v in tree_flatten(m.parameters())}, cfg)
    with pytest.raises(WeightError, match="unexpected key 'vision_model.bogus'"):
        hf_to_canonical(dict(hf_state, **{"vision_model.bogus": np.zeros(1)}), cfg, concat=np.concatenate)
    del hf_state["text_projection.weight"]
    with pytest.raises(WeightError, match="missing key 'text_projection.weight'"):
        hf_to_canonical(hf_state, cfg, concat=np.concatenate)


def test_logit_bias_mismatch_names_the_key_and_the_cause(tmp_path):
    """A SigLIP checkpoint into a model built without init_logit_bias, and the reverse, in both
    frameworks: the error names logit_bias and says the config and the weights do not match."""
    siglip, clip = mlx_clip.ModelConfig.from_dict(SIGLIP_ARCH), mlx_clip.ModelConfig.from_dict(ODD_ARCH)
    mlx_clip.save_weights(mlx_clip.create_model(siglip), tmp_path / "siglip.safetensors")
    mlx_clip.save_weights(mlx_clip.create_model(clip), tmp_path / "clip.safetensors")
    for create, load in [
        (mlx_clip.create_model, mlx_clip.load_weights),
        (lambda a: torch_ref.create_model(a, device="cpu"), torch_ref.load_weights),
    ]:
        with pytest.raises(WeightError, match=r"unexpected key 'logit_bias' \(these weights have SigLIP's"):
            load(create(clip), tmp_path / "siglip.safetensors")
        with pytest.raises(
            WeightError, match=r"missing key 'logit_bias' \(the model config sets init_logit_bias"
        ):
            load(create(siglip), tmp_path / "clip.safetensors")


def test_siglip_config_builds_the_bias_in_both_frameworks():
    """loss.type siglip -> ModelConfig with the SigLIP inits -> logit_bias in MLX and torch_ref alike."""
    cfg = load_config(None, [("loss.type", "siglip")]).model_config()
    m, t = mlx_clip.create_model(cfg), torch_ref.create_model(cfg, device="cpu")
    assert m.logit_bias.item() == t.logit_bias.item() == -10.0
    assert (
        m.logit_scale.item() == pytest.approx(math.log(10.0)) and t.logit_scale.item() == m.logit_scale.item()
    )


def test_hf_mapping_refuses_logit_bias():
    cfg = mlx_clip.ModelConfig.from_dict(SIGLIP_ARCH)
    state = {k: np.array(v) for k, v in tree_flatten(mlx_clip.create_model(cfg).parameters())}
    with pytest.raises(WeightError, match=r"^logit_bias: .*CLIPModel has no such parameter"):
        canonical_to_hf(state, cfg)
    # Nor is any other key dropped silently.
    plain = mlx_clip.ModelConfig.from_dict(ODD_ARCH)
    state = {k: v for k, v in state.items() if k != "logit_bias"}
    with pytest.raises(WeightError, match="unexpected key 'visual.extra'"):
        canonical_to_hf(dict(state, **{"visual.extra": np.zeros(1)}), plain)


@pytest.mark.parametrize("shape", [(), (1,)], ids=["scalar", "nonscalar"])
def test_open_clip_mapping_carries_logit_bias(shape):
    cfg = mlx_clip.ModelConfig.from_dict(SIGLIP_ARCH)
    state = {k: np.array(v) for k, v in tree_flatten(perturbed(cfg, seed=6).parameters())}
    oc = canonical_to_open_clip(state, cfg)
    assert oc["logit_bias"].shape == () and oc["logit_bias"] == state["logit_bias"] != np.float32(-10.0)
    oc = {
        k: v.reshape(shape) if k.startswith("logit_") else v for k, v in oc.items()
    }  # nonscalar_logit_scale
    back = open_clip_to_canonical(oc, cfg)
    assert back.keys() == state.keys()
    for k in state:
        assert back[k].shape == state[k].shape and np.array_equal(back[k], state[k]), k

    plain = mlx_clip.ModelConfig.from_dict(ODD_ARCH)  # a config without the bias: named, not dropped
    with pytest.raises(WeightError, match="unexpected key 'logit_bias' .*init_logit_bias"):
        open_clip_to_canonical(oc, plain)
    with pytest.raises(WeightError, match="unexpected key 'logit_bias'"):
        canonical_to_open_clip(state, plain)
    del oc["logit_bias"]
    with pytest.raises(WeightError, match="missing key 'logit_bias'"):
        open_clip_to_canonical(oc, cfg)
