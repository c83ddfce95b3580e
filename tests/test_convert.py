"""Weight exchange: canonical files across frameworks, strict loading, the HF key mapping."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import ODD_ARCH, random_tokens
from mlx.utils import tree_flatten

import mlx_clip
from mlx_clip.convert import WeightError, canonical_to_hf, hf_config_kwargs, hf_to_canonical

torch = pytest.importorskip("torch")
import torch_ref  # noqa: E402


def test_mlx_torch_mlx_round_trip_is_bit_exact(tmp_path):
    m = mlx_clip.create_model(ODD_ARCH, seed=3)
    mlx_clip.save_weights(m, tmp_path / "a.safetensors")
    t = torch_ref.create_model(ODD_ARCH, seed=4, device="cpu")
    torch_ref.load_weights(t, tmp_path / "a.safetensors")
    torch_ref.save_weights(t, tmp_path / "b.safetensors")
    m2 = mlx_clip.create_model(ODD_ARCH, seed=5)
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


@pytest.mark.parametrize("loader", ["mlx", "torch"])
def test_strict_loading_names_the_key(tmp_path, loader):
    m = mlx_clip.create_model("tiny")
    good = dict(tree_flatten(m.parameters()))
    if loader == "mlx":
        target, load = mlx_clip.create_model("tiny"), mlx_clip.load_weights
    else:
        target, load = torch_ref.create_model("tiny", device="cpu"), torch_ref.load_weights

    missing = dict(good)
    del missing["text.ln_final.bias"]
    mx.save_safetensors(str(tmp_path / "missing.safetensors"), missing)
    with pytest.raises(WeightError, match="missing key 'text.ln_final.bias'"):
        load(target, tmp_path / "missing.safetensors")

    extra = dict(good, **{"visual.extra.weight": mx.zeros((2,))})
    mx.save_safetensors(str(tmp_path / "extra.safetensors"), extra)
    with pytest.raises(WeightError, match="unexpected key 'visual.extra.weight'"):
        load(target, tmp_path / "extra.safetensors")

    bad = dict(good, **{"visual.proj.weight": mx.zeros((3, 4))})
    mx.save_safetensors(str(tmp_path / "bad.safetensors"), bad)
    with pytest.raises(WeightError, match=r"'visual.proj.weight' has shape \(3, 4\)"):
        load(target, tmp_path / "bad.safetensors")

    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load(target, tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load(target, tmp_path / "junk.safetensors")


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
    m = mlx_clip.create_model(HF_ARCHS[name], seed=7)
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
    cfg = mlx_clip.model_config(ODD_ARCH)
    m = mlx_clip.create_model(cfg)
    hf_state = canonical_to_hf({k: np.array(v) for k, v in tree_flatten(m.parameters())}, cfg)
    with pytest.raises(WeightError, match="unexpected key 'vision_model.bogus'"):
        hf_to_canonical(dict(hf_state, **{"vision_model.bogus": np.zeros(1)}), cfg, concat=np.concatenate)
    del hf_state["text_projection.weight"]
    with pytest.raises(WeightError, match="missing key 'text_projection.weight'"):
        hf_to_canonical(hf_state, cfg, concat=np.concatenate)
