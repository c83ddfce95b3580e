"""open_clip configs with a timm ViT image tower <-> ModelConfig (SigLIP, MobileCLIP2-L/14).

open_clip builds such a tower as `timm.create_model(timm_model_name, num_classes, global_pool)`
(open_clip/timm_model.py: TimmModel): the shapes live in timm's registered model definition, not
in the JSON, and open_clip passes no other argument to timm. So both ways go through timm itself:

* import reads the definition by building it on torch's "meta" device (no memory, no weights)
  and reading the modules: width, depth, heads, MLP width, patch and image size, class token,
  norm_pre, patch bias, LayerNorm eps, activation, the MAP head or class-token pooling. Anything
  mlx_clip's ViT does not compute (register tokens, layer scale, qk-norm, fc_norm, SwiGLU, ...)
  is refused by name.
* export looks for a registered timm ViT whose definition equals the model (vit_*_siglip_* for
  MAP pooling, vit_*_clip_* for a class token), because open_clip can build no other. A model no
  timm definition matches is refused with the closest candidate's difference.

The text tower is open_clip's own TextTransformer in a CustomTextCLIP: no_causal_mask, pool_type
argmax / last / first, proj_bias (a Linear with bias: our text_proj "head"), act_kwargs
{"approximate": "tanh"} (gelu_tanh). HF text towers (XLM-R, NLLB), CoCa and conv trunks are refused.
"""

from __future__ import annotations

import functools

from ..models.config import ModelConfig
from ..schema import ConfigError

# CLIPVisionCfg fields TimmModel never reads (open_clip ignores them for a timm tower), and the
# ones that change no weight or inference feature.
_VISION_UNUSED = {
    "layers", "width", "head_width", "mlp_ratio", "patch_size", "ls_init_value", "patch_dropout",
    "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre", "pos_embed_type",
    "final_ln_after_pool", "pool_type", "output_tokens", "act_kwargs", "norm_kwargs", "block_type",
    "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc",
    "timm_model_pretrained", "timm_drop", "timm_drop_path", "image_size",
}  # fmt: skip
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_TIMM_FIELDS = {"timm_model_name", "timm_pool", "timm_proj", "timm_proj_bias"}
_TEXT_FIXED = {
    "ls_init_value": (None,),
    "embed_cls": (False,),
    "final_ln_after_pool": (False,),
    "pool_type": ("argmax", "last", "first"),
    "proj_type": ("linear", "none"),
    "block_type": (None, "default"),
    **{k: (False,) for k in _CUSTOM_BLOCK},
}
_TEXT_KNOWN = {
    "context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "no_causal_mask",
    "proj_bias", "act_kwargs", "norm_kwargs", "pad_id", "eos_id", "output_tokens", "hf_model_pretrained",
    "hf_proj_type", "hf_pooler_type", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs",
}  # fmt: skip
_TOP_KNOWN = {
    "embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_scale",
    "init_logit_bias", "nonscalar_logit_scale",
}  # fmt: skip
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0)


def is_timm_config(model_cfg: dict) -> bool:
    return bool((model_cfg.get("vision_cfg") or {}).get("timm_model_name"))


# ---------------------------------------------------------------------------
# model_cfg field checks (open_clip.py's OpenAI-layout mapping uses them too)


def field_problems(section: dict, fixed: dict, known: set, where: str) -> list[str]:
    """One message per field of `section` that does not map: a value outside `fixed[key]`, or a
    key neither fixed nor `known`."""
    problems = []
    for key, value in section.items():
        if key in fixed:
            if value not in fixed[key]:
                allowed = " or ".join(repr(v) for v in fixed[key])
                problems.append(f"{where}.{key}={value!r} is not supported by mlx_clip (needs {allowed})")
        elif key not in known:
            problems.append(f"{where}.{key}: unknown or unsupported open_clip config field")
    return problems


def layer_norm_eps(section: dict, where: str) -> float:
    norm = section.get("norm_kwargs") or {}
    if set(norm) - {"eps"}:
        raise ConfigError(f"{where}.norm_kwargs={norm}: only 'eps' is supported")
    return float(norm.get("eps", 1e-5))


def optional_float(section: dict, key: str, where: str) -> float | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.{key}={value!r}: expected a number")
    return float(value)


# ---------------------------------------------------------------------------
# timm's model definitions, read from the modules timm builds


def _activation(act) -> str | None:
    name = type(act).__name__
    if name == "GELU":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(getattr(act, "approximate", "none"))
    return {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}.get(name)


@functools.lru_cache(maxsize=64)
def timm_vit_spec(name: str, pool: str) -> tuple[tuple, tuple]:
    """(spec items, unsupported parts) of timm model `name` built with global_pool `pool`."""
    import timm
    import torch
    from timm.layers import AttentionPoolLatent, Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False, num_classes=0, global_pool=pool)
    if type(m) is not VisionTransformer:
        return (), (f"a {type(m).__name__} (not timm's plain VisionTransformer)",)
    if type(m.patch_embed) is not PatchEmbed:
        return (), (f"a {type(m.patch_embed).__name__} patch embedding (a conv stem, not PatchEmbed)",)
    identity, bad = torch.nn.Identity, []
    b0 = m.blocks[0]
    for part, ok in (
        ("reg_tokens", not m.num_reg_tokens),
        ("no_embed_class", not (m.no_embed_class and m.has_class_token)),
        ("pos_embed (none)", m.pos_embed is not None),
        ("patch_embed.norm", isinstance(m.patch_embed.norm, identity)),
        ("fc_norm", isinstance(m.fc_norm, identity)),
        ("final_norm (none)", not isinstance(m.norm, identity)),
        ("a block type other than Block", all(type(b) is Block for b in m.blocks)),
        ("layer scale (init_values)", all(isinstance(b.ls1, identity) for b in m.blocks)),
        ("an attention other than timm's Attention", all(type(b.attn) is Attention for b in m.blocks)),
        ("qk_norm / attention scale_norm", all(
            isinstance(getattr(b.attn, n, identity()), identity)
            for b in m.blocks for n in ("q_norm", "k_norm", "norm")
        )),
        ("qkv_bias / proj_bias off", b0.attn.qkv.bias is not None and b0.attn.proj.bias is not None),
        ("an MLP other than Mlp (SwiGLU, GLU)", all(type(b.mlp) is Mlp for b in m.blocks)),
        ("mlp norm (scale_mlp_norm)", all(isinstance(b.mlp.norm, identity) for b in m.blocks)),
    ):  # fmt: skip
        if not ok:
            bad.append(part)
    if pool == "map":
        ap = m.attn_pool
        if not isinstance(ap, AttentionPoolLatent) or ap.latent_len != 1 or ap.pos_embed is not None:
            bad.append("attn_pool (not a single-latent AttentionPoolLatent)")
        elif isinstance(ap.q, identity) or not isinstance(ap.q_norm, identity) or ap.mlp is None:
            bad.append("attn_pool (q_proj off, qk_norm or no MLP)")
        elif ap.mlp.fc1.out_features != b0.mlp.fc1.out_features or _activation(ap.mlp.act) is None:
            bad.append("attn_pool.mlp (another width or activation than the blocks')")
        if m.has_class_token:
            bad.append("class_token with MAP pooling")
    elif pool == "token" and not m.has_class_token:
        bad.append("token pooling without a class token")
    acts = {_activation(b.mlp.act) for b in m.blocks}
    if None in acts or len(acts) > 1:
        bad.append(f"activation {type(b0.mlp.act).__name__}")
    norms = [b.norm1 for b in m.blocks] + [b.norm2 for b in m.blocks] + [m.norm, m.norm_pre]
    norms = [x for x in norms + [getattr(m.attn_pool, "norm", None)] if x is not None]
    if any(not isinstance(x, (torch.nn.LayerNorm, identity)) or isinstance(x, torch.nn.LayerNorm)
           and (x.weight is None or x.bias is None) for x in norms):  # fmt: skip
        bad.append("a norm other than LayerNorm with gain and bias (RmsNorm, ...)")
    norms = [x for x in norms if isinstance(x, torch.nn.LayerNorm)]
    if len({x.eps for x in norms}) > 1:
        bad.append("LayerNorms with different eps")
    patch, image = m.patch_embed.patch_size, m.patch_embed.img_size
    if patch[0] != patch[1] or image is None or image[0] != image[1]:
        bad.append(f"non-square patch {patch} or image {image}")
    elif image[0] % patch[0] and m.patch_embed.dynamic_img_pad:  # pads where we leave out pixels
        bad.append("dynamic_img_pad with an image size that is not a multiple of the patch size")
    # dynamic_img_size is ignored: at the model's own image size it computes the same (its position
    # grid is used as is); other sizes go through mlx_clip's resampling on fine-tuning.
    spec = dict(
        vision_width=m.embed_dim,
        vision_layers=len(m.blocks),
        vision_heads=b0.attn.num_heads,
        vision_mlp_dim=b0.mlp.fc1.out_features,
        patch_size=patch[0],
        image_size=image[0] if image else None,
        patch_bias=m.patch_embed.proj.bias is not None,
        vision_pool="cls" if m.has_class_token else "map",
        vision_pre_norm=not isinstance(m.norm_pre, identity),
        layer_norm_eps=norms[0].eps if norms else None,
        vision_activation=acts.pop() if len(acts) == 1 else None,
    )
    return tuple(spec.items()), tuple(bad)


def _spec(name: str, pool: str, where: str) -> dict:
    """timm model `name`'s shapes as ModelConfig fields; errors name `where` (the config field)."""
    try:
        items, bad = timm_vit_spec(name, pool)
    except ImportError as e:
        raise ConfigError(
            f"{where}={name!r}: reading a timm model definition needs timm and torch ({e})"
        ) from None
    except RuntimeError as e:  # timm: "Unknown model"
        raise ConfigError(f"{where}={name!r}: {e}") from None
    if bad:
        raise ConfigError(f"{where}={name!r} does not map onto mlx_clip's ViT: {', '.join(bad)}")
    return dict(items)


def _text_activation(traw: dict, quick_gelu: bool, where: str) -> str:
    kwargs = traw.get("act_kwargs") or {}
    if quick_gelu and not kwargs:
        return "quick_gelu"
    approx = kwargs.get("approximate", "none") if set(kwargs) <= {"approximate"} else None
    if quick_gelu or approx not in ("none", "tanh"):
        raise ConfigError(f"{where}.act_kwargs={kwargs!r} (quick_gelu {quick_gelu}) is not supported")
    return {"none": "gelu", "tanh": "gelu_tanh"}[approx]


def _vision_fields(vraw: dict, vw: str) -> dict:
    name, pool = vraw["timm_model_name"], vraw.get("timm_pool", "avg")
    if not str(name).startswith("vit_"):
        raise ConfigError(
            f"{vw}.timm_model_name={name!r}: only timm's plain ViTs (vit_*) map onto mlx_clip, not "
            "this image tower (a conv, hybrid, EVA, Swin, ... model)"
        )
    if pool not in ("map", "token"):
        raise ConfigError(f"{vw}.timm_pool={pool!r} is not supported (needs 'map' or 'token')")
    proj = vraw.get("timm_proj", "linear")
    if proj not in ("none", None, "", "linear"):
        raise ConfigError(f"{vw}.timm_proj={proj!r} is not supported (needs 'none', null or 'linear')")
    spec = _spec(name, pool, f"{vw}.timm_model_name")
    image = vraw.get("image_size", spec["image_size"])
    if (list(image) if isinstance(image, (list, tuple)) else [image, image]) != [spec["image_size"]] * 2:
        raise ConfigError(f"{vw}.image_size={image!r}: timm's {name} is built for {spec['image_size']} px")
    # "none": the trunk's features; null / "": timm's classifier Linear (with bias) to embed_dim;
    # "linear": open_clip's own Linear (bias: timm_proj_bias).
    spec["vision_proj"] = proj != "none"
    spec["vision_proj_bias"] = proj in (None, "") or (proj == "linear" and bool(vraw.get("timm_proj_bias")))
    if spec["vision_mlp_dim"] == 4 * spec["vision_width"]:
        spec["vision_mlp_dim"] = None
    return spec


def timm_model_config(model_cfg: dict, where: str = "model_cfg") -> ModelConfig:
    """An open_clip model_cfg with a timm ViT image tower -> ModelConfig; errors name the fields."""
    vw, tw = f"{where}.vision_cfg", f"{where}.text_cfg"
    vraw, traw = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    bad = [f"{where}.multimodal_cfg: CoCa models are not supported"] if "multimodal_cfg" in model_cfg else []
    bad += field_problems(model_cfg, {"custom_text": (True,)}, _TOP_KNOWN, where)
    if traw.get("hf_model_name"):
        bad.append(
            f"{tw}.hf_model_name={traw['hf_model_name']!r}: a Hugging Face text tower (XLM-R, NLLB, ...) "
            "is not supported"
        )
    bad += field_problems(vraw, {}, _VISION_UNUSED | _TIMM_FIELDS, vw)
    text_fields = {k: v for k, v in traw.items() if k != "hf_model_name"}
    bad += field_problems(text_fields, _TEXT_FIXED, _TEXT_KNOWN, tw)
    if bad:  # every part that does not map, by name
        raise ConfigError("; ".join(bad))
    vision = _vision_fields(vraw, vw)
    text = {**_TEXT_DEFAULTS, **traw}
    eps = layer_norm_eps(text, tw)
    if eps != vision["layer_norm_eps"]:
        raise ConfigError(
            f"{tw}.norm_kwargs.eps={eps} differs from the eps of timm's "
            f"{vraw['timm_model_name']} ({vision['layer_norm_eps']}); mlx_clip uses one"
        )
    text_act = _text_activation(traw, bool(model_cfg.get("quick_gelu")), tw)
    mlp = int(text["width"] * text["mlp_ratio"])  # open_clip's MLP width
    cfg = ModelConfig(
        embed_dim=model_cfg["embed_dim"],
        **{k: v for k, v in vision.items() if k != "vision_activation"},
        activation=vision["vision_activation"],
        text_activation=None if text_act == vision["vision_activation"] else text_act,
        context_length=text["context_length"],
        vocab_size=text["vocab_size"],
        text_width=text["width"],
        text_layers=text["layers"],
        text_heads=text["heads"],
        text_mlp_dim=None if mlp == 4 * text["width"] else mlp,
        text_causal=not text.get("no_causal_mask", False),
        text_pool=text.get("pool_type", "argmax"),
        text_proj="none" if text.get("proj_type") == "none" else "head" if text.get("proj_bias") else "proj",
        init_logit_scale=optional_float(model_cfg, "init_logit_scale", where),
        init_logit_bias=optional_float(model_cfg, "init_logit_bias", where),
    )
    cfg.validate(where)
    return cfg


# ---------------------------------------------------------------------------
# ModelConfig -> open_clip model_cfg


def needs_timm(cfg: ModelConfig) -> bool:
    """True when open_clip's own CLIP (the OpenAI layout, open_clip.py) cannot express `cfg`."""
    return (
        (cfg.vision_pool, cfg.patch_bias, cfg.vision_pre_norm, cfg.vision_proj, cfg.vision_proj_bias)
        != ("cls", False, True, True, False)
        or (cfg.text_causal, cfg.text_pool, cfg.text_proj) != (True, "argmax", "proj")
        or cfg.tower_activation("vision") != cfg.tower_activation("text")
        or cfg.activation == "gelu_tanh"
        or any(
            cfg.mlp_hidden(t) != int(getattr(cfg, f"{t}_width") * cfg.mlp_ratio) for t in ("vision", "text")
        )
    )


def _wanted(cfg: ModelConfig) -> dict:
    """The timm definition's fields (timm_vit_spec) that `cfg`'s image tower needs."""
    return dict(
        vision_width=cfg.vision_width,
        vision_layers=cfg.vision_layers,
        vision_heads=cfg.vision_heads,
        vision_mlp_dim=cfg.mlp_hidden("vision"),
        patch_size=cfg.patch_size,
        image_size=cfg.image_size,
        patch_bias=cfg.patch_bias,
        vision_pool=cfg.vision_pool,
        vision_pre_norm=cfg.vision_pre_norm,
        layer_norm_eps=cfg.layer_norm_eps,
        vision_activation=cfg.tower_activation("vision"),
    )


def find_timm_vit(cfg: ModelConfig) -> tuple[str, str]:
    """(timm model name, global_pool) of a registered timm ViT whose definition is `cfg`'s image
    tower: vit_*_siglip_* for MAP pooling, vit_*_clip_* for a class token."""
    try:
        import timm
    except ImportError as e:
        raise ConfigError(f"exporting this architecture to open_clip needs timm ({e})") from None
    want = _wanted(cfg)
    pool, family = ("map", "siglip") if cfg.vision_pool == "map" else ("token", "clip")
    closest: tuple[str, list[str]] | None = None
    for name in timm.list_models(f"vit_*patch{cfg.patch_size}*{family}*"):
        try:
            items, bad = timm_vit_spec(name, pool)
        except Exception:  # a definition timm cannot build with this pool
            continue
        if bad:
            continue
        spec = dict(items)
        diff = [f"{k} {spec[k]!r} (ours {v!r})" for k, v in want.items() if spec[k] != v]
        if not diff:
            return name, pool
        if closest is None or len(diff) < len(closest[1]):
            closest = (name, diff)
    near = f"; the closest, {closest[0]}, differs in {', '.join(closest[1])}" if closest else ""
    raise ConfigError(
        "open_clip builds a timm image tower only from a registered timm model name, and no "
        f"timm vit_*patch{cfg.patch_size}*{family}* definition has this model's image tower{near}. "
        "Export with --to hf or --to torch_ref, or use an architecture open_clip has (e.g. imported "
        "from an open_clip ViT-*-SigLIP* config)"
    )


def _mlp_ratio(width: int, hidden: int) -> float:
    """A ratio that gives `hidden` units under open_clip's int(width * mlp_ratio)."""
    for ratio in (hidden / width, (hidden + 0.5) / width):
        if int(width * ratio) == hidden:
            return ratio
    raise ConfigError(f"no mlp_ratio gives {hidden} MLP units at width {width} in open_clip")


def open_clip_timm_cfg(cfg: ModelConfig) -> tuple[dict, str]:
    """ModelConfig -> (open_clip model_cfg with a timm image tower, the HEADS entry of its projection)."""
    name, pool = find_timm_vit(cfg)
    # "none": no projection; null: timm's classifier Linear, with bias; "linear": open_clip's, no bias
    proj = "none" if not cfg.vision_proj else None if cfg.vision_proj_bias else "linear"
    act = cfg.tower_activation("text")
    text = {
        "context_length": cfg.context_length,
        "vocab_size": cfg.vocab_size,
        "width": cfg.text_width,
        "heads": cfg.text_heads,
        "layers": cfg.text_layers,
        "mlp_ratio": _mlp_ratio(cfg.text_width, cfg.mlp_hidden("text")),
        "no_causal_mask": not cfg.text_causal,
        "pool_type": cfg.text_pool,
        "proj_bias": cfg.text_proj == "head",
        **({"proj_type": "none"} if cfg.text_proj == "none" else {}),
        **({"act_kwargs": {"approximate": "tanh"}} if act == "gelu_tanh" else {}),
        "norm_kwargs": {"eps": cfg.layer_norm_eps},
    }
    inits = {k: v for k in ("init_logit_scale", "init_logit_bias") if (v := getattr(cfg, k)) is not None}
    vision = {
        "image_size": cfg.image_size,
        "timm_model_name": name,
        "timm_model_pretrained": False,
        "timm_pool": pool,
        "timm_proj": proj,
    }
    model_cfg = {
        "embed_dim": cfg.embed_dim,
        "custom_text": True,
        "quick_gelu": act == "quick_gelu",  # the text tower's; timm towers ignore it
        **inits,
        "vision_cfg": vision,
        "text_cfg": text,
    }
    return model_cfg, "linear" if proj == "linear" else "trunk"
