"""open_clip models with a timm ViT image tower (SigLIP, SigLIP 2, MobileCLIP2-L/14) in and out.

open_clip builds a timm tower only from a registered timm model name, so tiny definitions with sizes
that are not powers of two are registered here (as timm registers its own), and the installed
open_clip JSON configs are shrunk onto them: everything else in each JSON (pooling, text options,
activations, eps, logit bias) stays as published. All offline, at random init, perturbed.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from test_interop import (
    ATOL,
    assert_same_weights,
    inputs,
    load_mlx,
    mlx_features,
    mlx_model,
    open_clip_dir,
    save_mlx,
    torch_features,
)

from mlx_clip import convert, export
from mlx_clip.models.config import model_config
from mlx_clip.schema import ConfigError, to_dict

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
from timm.models import register_model  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

_FACTORY_ONLY = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _vit(**args):
    def build(**kwargs):
        model = VisionTransformer(**{**args, **{k: v for k, v in kwargs.items() if k not in _FACTORY_ONLY}})
        model.pretrained_cfg = model.default_cfg = {}  # as timm's build_model_with_cfg sets them
        return model

    return build


# 33 px in 6 px patches leaves a 3 px remainder, as SigLIP's 384 px / 14 px does.
SIGLIP_VIT = dict(img_size=33, patch_size=6, embed_dim=60, depth=2, num_heads=5, mlp_ratio=3.5)
CLIP_VIT = dict(img_size=28, patch_size=7, embed_dim=60, depth=2, num_heads=5, pre_norm=True)
for _name, _fn in {
    "vit_odd_patch6_siglip_33": _vit(**SIGLIP_VIT, class_token=False, global_pool="map"),
    "vit_oddtanh_patch6_siglip_33": _vit(
        **SIGLIP_VIT, class_token=False, global_pool="map", act_layer="gelu_tanh"
    ),
    "vit_odd_patch7_clip_28": _vit(**CLIP_VIT, norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)),
    "vit_oddreg_patch6_siglip_33": _vit(**SIGLIP_VIT, class_token=False, global_pool="map", reg_tokens=2),
}.items():
    _fn.__name__ = _name
    register_model(_fn)

TEXT = dict(context_length=13, vocab_size=600, width=50, heads=5, layers=2)


def shrunk(name: str, timm_name: str, image_size: int, embed_dim: int) -> dict:
    """The installed open_clip config `name`, on a tiny registered timm tower and a tiny text tower."""
    cfg = json.loads((Path(open_clip.__file__).parent / "model_configs" / f"{name}.json").read_text())
    cfg["embed_dim"] = embed_dim
    cfg["vision_cfg"].update(timm_model_name=timm_name, image_size=image_size)
    cfg["text_cfg"].update(TEXT)
    return cfg


CASES = {
    # SigLIP: MAP head, no projection, bidirectional text pooled last with a Linear head, SO400M's
    # MLP ratio 3.7362 in the text tower, eps 1e-6, logit_bias
    "siglip_so400m": shrunk("ViT-SO400M-14-SigLIP-384", "vit_odd_patch6_siglip_33", 33, 60),
    # SigLIP 2: exact-GELU timm tower, tanh-GELU text tower
    "siglip2": shrunk("ViT-B-16-SigLIP2-256", "vit_odd_patch6_siglip_33", 33, 60),
    "siglip2_tanh_vit": shrunk("ViT-B-32-SigLIP2-256", "vit_oddtanh_patch6_siglip_33", 33, 60),
    # MobileCLIP2-L/14: class token, ln_pre, timm's classifier (with bias) as the projection,
    # bidirectional text pooled at the EOT token, projection matrix without bias
    "mobileclip2_l14": shrunk("MobileCLIP2-L-14", "vit_odd_patch7_clip_28", 28, 24),
}
ACTIVATIONS = {  # (image tower, text tower)
    "siglip_so400m": ("gelu", "gelu"),
    "siglip2": ("gelu", "gelu_tanh"),
    "siglip2_tanh_vit": ("gelu_tanh", "gelu_tanh"),
    "mobileclip2_l14": ("gelu", "gelu"),
}


@pytest.mark.parametrize("case", CASES)
def test_import_features_match_open_clip(tmp_path, case):
    oc = open_clip_dir(tmp_path / "oc", CASES[case], seed=3)
    convert.main(["--from", "open_clip", str(tmp_path / "oc"), "--out", str(tmp_path / "mlx")])
    m = load_mlx(tmp_path / "mlx")
    cfg = m.config
    assert (cfg.tower_activation("vision"), cfg.tower_activation("text")) == ACTIVATIONS[case]
    images, tokens = inputs(cfg, seed=4)
    theirs = torch_features(oc.encode_image, oc.encode_text, images, tokens)
    for a, b in zip(mlx_features(m, images, tokens), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    assert m.logit_scale.item() == oc.logit_scale.item()
    if oc.logit_bias is None:
        assert cfg.init_logit_bias is None and "logit_bias" not in m.parameters()
    else:
        assert cfg.init_logit_bias == -10.0 and m.logit_bias.item() == oc.logit_bias.item() != -10.0


def test_import_a_state_dict_with_arch(tmp_path):
    """A bare open_clip state dict (training checkpoint) + --arch JSON: the layout is read from the keys."""
    from safetensors.torch import save_file

    oc = open_clip_dir(tmp_path / "oc", CASES["siglip2"], seed=7)
    save_file(oc.state_dict(), str(tmp_path / "weights.safetensors"))
    (tmp_path / "arch.json").write_text(json.dumps({"model_cfg": CASES["siglip2"]}))
    args = [
        "--from",
        "open_clip",
        str(tmp_path / "weights.safetensors"),
        "--arch",
        str(tmp_path / "arch.json"),
    ]
    convert.main([*args, "--out", str(tmp_path / "mlx")])
    m = load_mlx(tmp_path / "mlx")
    images, tokens = inputs(m.config, seed=8)
    theirs = torch_features(oc.encode_image, oc.encode_text, images, tokens)
    for a, b in zip(mlx_features(m, images, tokens), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    state = {k: v for k, v in oc.state_dict().items() if k != "visual.trunk.attn_pool.kv.weight"}
    save_file(state, str(tmp_path / "weights.safetensors"))
    with pytest.raises(SystemExit, match=r"missing key 'visual.trunk.attn_pool.kv.weight'"):
        convert.main([*args, "--out", str(tmp_path / "bad")])


EXPORT_CASES = {
    "siglip_so400m": "siglip_so400m",
    "siglip2": "siglip2",
    "mobileclip2_l14": "mobileclip2_l14",
    # no bias on the projection: open_clip's own Linear (timm_proj "linear", visual.head.proj)
    "clip_proj_no_bias": "mobileclip2_l14",
}


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_loads_in_open_clip_and_round_trips(tmp_path, case):
    from mlx_clip.interop.open_clip import arch_config

    json_path = tmp_path / "arch.json"
    json_path.write_text(json.dumps(CASES[EXPORT_CASES[case]]))
    arch = to_dict(arch_config(str(json_path)))
    if case == "clip_proj_no_bias":
        arch["vision_proj_bias"] = False
    m = mlx_model(arch, seed=5)
    ckpt = save_mlx(m, tmp_path / "ckpt")
    out = tmp_path / "oc"
    export.main(["--checkpoint", str(ckpt), "--to", "open_clip", "--out", str(out)])

    oc = open_clip.create_model(f"local-dir:{out}")  # strict load_state_dict inside
    assert type(oc).__name__ == "CustomTextCLIP"
    vision_cfg = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]
    assert vision_cfg["timm_model_name"] == CASES[EXPORT_CASES[case]]["vision_cfg"]["timm_model_name"]
    assert vision_cfg["timm_proj"] == {"clip_proj_no_bias": "linear", "mobileclip2_l14": None}.get(
        case, "none"
    )
    images, tokens = inputs(m.config, seed=6)
    theirs = torch_features(oc.eval().encode_image, oc.encode_text, images, tokens)
    for a, b in zip(mlx_features(m, images, tokens), theirs, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    if m.config.init_logit_bias is not None:  # kept, bit for bit
        assert oc.logit_bias.item() == m.logit_bias.item()
    convert.main(["--from", "open_clip", str(out), "--out", str(tmp_path / "back")])
    assert_same_weights(ckpt, tmp_path / "back")
    # (a checkpoint with a logit_bias is a SigLIP run: an unset init_logit_scale reads as log 10)
    back = load_mlx(tmp_path / "back").config
    assert replace(back, init_logit_scale=m.config.init_logit_scale) == m.config


def test_named_mobileclip2_l14_is_open_clips():
    """configs/models/mobileclip2_l14.yaml is open_clip's MobileCLIP2-L-14, with its parameter count."""
    from open_clip.factory import get_model_config

    from mlx_clip.interop.open_clip import arch_config

    cfg = model_config("mobileclip2_l14")
    assert arch_config("MobileCLIP2-L-14") == cfg
    oc_cfg = get_model_config("MobileCLIP2-L-14")
    oc_cfg.pop("custom_text")
    with torch.device("meta"):  # shapes only
        oc = open_clip.model.CustomTextCLIP(**oc_cfg)
    assert cfg.num_parameters == sum(p.numel() for p in oc.parameters()) == 427_617_281


@pytest.mark.parametrize(
    "name,field",
    [
        (
            "MobileCLIP2-S2",
            r"vision_cfg\.timm_model_name='fastvit_mci2': only timm's plain ViTs",
        ),  # conv trunk
        ("coca_ViT-B-32", r"multimodal_cfg"),
        ("nllb-clip-base-siglip", r"text_cfg\.hf_model_name='facebook/nllb.*Hugging Face text tower"),
        ("xlm-roberta-base-ViT-B-32", r"text_cfg\.hf_model_name"),
    ],
)
def test_unmapped_open_clip_parts_are_refused_by_name(name, field):
    from mlx_clip.interop.open_clip import arch_config

    with pytest.raises(ConfigError, match=rf"^{name}: model_cfg\.{field}"):
        arch_config(name)


def test_timm_definitions_that_do_not_map_are_refused(tmp_path):
    from mlx_clip.interop.open_clip import arch_config

    cfg = dict(CASES["siglip2"])
    cfg["vision_cfg"] = dict(cfg["vision_cfg"], timm_model_name="vit_oddreg_patch6_siglip_33")
    (tmp_path / "reg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"vision_cfg\.timm_model_name='vit_oddreg.*reg_tokens"):
        arch_config(str(tmp_path / "reg.json"))
    cfg["vision_cfg"] = dict(cfg["vision_cfg"], timm_model_name="vit_odd_patch6_siglip_33", timm_pool="avg")
    (tmp_path / "avg.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"vision_cfg\.timm_pool='avg'"):
        arch_config(str(tmp_path / "avg.json"))


def test_export_refuses_an_image_tower_no_timm_model_has(tmp_path):
    """open_clip can build only registered timm towers: the message names the closest one's difference."""
    from mlx_clip.interop.open_clip import arch_config

    (tmp_path / "a.json").write_text(json.dumps(CASES["siglip2"]))
    arch = dict(to_dict(arch_config(str(tmp_path / "a.json"))), vision_activation="quick_gelu")
    ckpt = save_mlx(mlx_model(arch, seed=0), tmp_path / "ckpt")
    with pytest.raises(SystemExit, match=r"vit_odd_patch6_siglip_33, differs in vision_activation 'gelu'"):
        export.main(["--checkpoint", str(ckpt), "--to", "open_clip", "--out", str(tmp_path / "oc")])
    assert not (tmp_path / "oc").exists()


def test_import_takes_the_directorys_tokenizer(tmp_path, capsys):
    """hf_tokenizer_name is a hub name (not downloaded): the directory's own files are used, with
    the config's text cleaning; without them the weights import and the note says what to add."""
    import shutil

    from test_tokenizers_hf import t5_like

    from mlx_clip.interop.files import read_checkpoint

    cfg = dict(CASES["siglip2"], text_cfg=dict(CASES["siglip2"]["text_cfg"], vocab_size=400))
    open_clip_dir(tmp_path / "bare", cfg, seed=9)
    convert.main(["--from", "open_clip", str(tmp_path / "bare"), "--out", str(tmp_path / "mlx_bare")])
    assert "put its files (tokenizer.json" in capsys.readouterr().out
    shutil.copytree(t5_like(tmp_path / "t5"), tmp_path / "bare", dirs_exist_ok=True)  # 400 tokens
    convert.main(["--from", "open_clip", str(tmp_path / "bare"), "--out", str(tmp_path / "mlx")])
    tok = read_checkpoint(tmp_path / "mlx")[3]
    assert (tok.vocab_size, tok.clean, tok.context_length) == (400, "canonicalize", 13)
