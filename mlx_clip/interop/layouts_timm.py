"""canonical <-> open_clip models whose image tower is a timm ViT (open_clip's TimmModel).

open_clip's SigLIP configs (`ViT-*-SigLIP*`) and MobileCLIP2-L/14 are CustomTextCLIP models: the
image tower is `visual.trunk` (timm's VisionTransformer), the text tower open_clip's own under
`text.`. Differences from the canonical layout, all handled here:

* timm names: patch_embed.proj (conv, OIHW), pos_embed (1, N, W), cls_token (1, 1, W), norm_pre,
  blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm;
* the MAP head (attn_pool): latent (1, 1, W), and separate q (W -> W) and kv (W -> 2W) linears,
  which are our fused in_proj's first W rows and last 2W rows;
* the image projection: timm's classifier `visual.trunk.head` (timm_proj null: a Linear with
  bias) or open_clip's `visual.head.proj` (timm_proj "linear");
* the text output: `text.text_projection`, a (W, E) matrix applied as x @ P (our "proj",
  transposed) or a Linear with bias (our "head").

Like layouts.py this imports no framework: dicts of numpy, MLX or torch arrays in and out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .layouts import (
    _OC_BLOCK,
    _OC_IGNORED,
    _OC_IGNORED_SUFFIXES,
    BIAS_KEY,
    CONV_KEYS,
    OHWI_TO_OIHW,
    OIHW_TO_OHWI,
    WeightError,
    _key_error,
    _permute,
    _shape,
)

TRUNK = "visual.trunk."
# Where the image projection lives: timm's classifier or open_clip's adapter head.
HEADS = {"trunk": "visual.trunk.head", "linear": "visual.head.proj"}
_LN = ("weight", "bias")
_TIMM_BLOCK = {
    "ln_1": "norm1",
    "attn.in_proj": "attn.qkv",
    "attn.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_POOL = {"attn.out_proj": "proj", "norm": "norm", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# canonical key -> how many leading 1-dims timm's tensor has on top of ours
_LEADING_ONES = {"visual.class_embedding": 2, "visual.positional_embedding": 1}


def is_timm_layout(state: Mapping[str, Any]) -> bool:
    """An open_clip state dict whose image tower is a timm model."""
    return any(k.startswith(TRUNK) for k in state)


def head_of(state: Mapping[str, Any]) -> str:
    """Which HEADS entry holds the image projection in an open_clip state dict ("trunk" if none)."""
    return "linear" if f"{HEADS['linear']}.weight" in state else "trunk"


def _vision_map(cfg: Any, head: str) -> dict[str, str]:
    """canonical key -> open_clip key for the image tower, except the MAP head's in_proj."""
    m = {"visual.patch_embed.weight": f"{TRUNK}patch_embed.proj.weight"}
    if cfg.patch_bias:
        m["visual.patch_embed.bias"] = f"{TRUNK}patch_embed.proj.bias"
    m["visual.positional_embedding"] = f"{TRUNK}pos_embed"
    if cfg.vision_pool == "cls":
        m["visual.class_embedding"] = f"{TRUNK}cls_token"
    else:
        m["visual.attn_pool.probe"] = f"{TRUNK}attn_pool.latent"
        for ours, theirs in _POOL.items():
            for p in _LN:
                m[f"visual.attn_pool.{ours}.{p}"] = f"{TRUNK}attn_pool.{theirs}.{p}"
    if cfg.vision_pre_norm:
        m.update({f"visual.ln_pre.{p}": f"{TRUNK}norm_pre.{p}" for p in _LN})
    m.update({f"visual.ln_post.{p}": f"{TRUNK}norm.{p}" for p in _LN})
    for i in range(cfg.vision_layers):
        for ours, theirs in _TIMM_BLOCK.items():
            for p in _LN:
                m[f"visual.transformer.resblocks.{i}.{ours}.{p}"] = f"{TRUNK}blocks.{i}.{theirs}.{p}"
    if cfg.vision_proj:
        m["visual.proj.weight"] = f"{HEADS[head]}.weight"
        if cfg.vision_proj_bias:
            m["visual.proj.bias"] = f"{HEADS[head]}.bias"
    return m


def _text_map(cfg: Any) -> dict[str, str]:
    m = {
        "text.token_embedding.weight": "text.token_embedding.weight",
        "text.positional_embedding": "text.positional_embedding",
        "text.ln_final.weight": "text.ln_final.weight",
        "text.ln_final.bias": "text.ln_final.bias",
    }
    if cfg.text_proj == "proj":
        m["text.text_projection.weight"] = "text.text_projection"  # (W, E), transposed
    elif cfg.text_proj == "head":
        m.update({f"text.head.{p}": f"text.text_projection.{p}" for p in _LN})
    for i in range(cfg.text_layers):
        for ours, theirs in _OC_BLOCK.items():
            m[f"text.transformer.resblocks.{i}.{ours}"] = f"text.transformer.resblocks.{i}.{theirs}"
    return m


def timm_key_map(cfg: Any, head: str = "trunk") -> dict[str, str]:
    """canonical key -> open_clip key, for every tensor but the MAP head's fused in_proj."""
    m = {**_vision_map(cfg, head), **_text_map(cfg), "logit_scale": "logit_scale"}
    if cfg.init_logit_bias is not None:
        m[BIAS_KEY] = BIAS_KEY
    return m


_IN_PROJ = ("visual.attn_pool.attn.in_proj.weight", "visual.attn_pool.attn.in_proj.bias")


def canonical_to_open_clip_timm(state: Mapping[str, Any], cfg: Any, head: str = "trunk") -> dict[str, Any]:
    """Canonical weights -> an open_clip CustomTextCLIP (timm image tower) state dict."""
    mapping = timm_key_map(cfg, head)
    fused = set(_IN_PROJ) if cfg.vision_pool == "map" else set()
    extra = sorted(set(state) - set(mapping) - fused)
    if extra:  # nothing is dropped on the way out
        raise _key_error("canonical weights", "unexpected", extra)
    out = {}
    for ours, theirs in mapping.items():
        x = state[ours]
        if ours in CONV_KEYS:
            x = _permute(x, OHWI_TO_OIHW)
        elif ours == "text.text_projection.weight":
            x = _permute(x, (1, 0))
        elif ours in _LEADING_ONES:
            x = x.reshape((1,) * _LEADING_ONES[ours] + _shape(x))
        out[theirs] = x
    if fused:
        w = cfg.vision_width
        for ours, p in zip(_IN_PROJ, _LN, strict=True):
            out[f"{TRUNK}attn_pool.q.{p}"] = state[ours][:w]
            out[f"{TRUNK}attn_pool.kv.{p}"] = state[ours][w:]
    return out


def open_clip_timm_to_canonical(oc_state: Mapping[str, Any], cfg: Any, concat) -> dict[str, Any]:
    """An open_clip CustomTextCLIP (timm image tower) state dict -> canonical weights.

    `concat(list_of_arrays)` joins along axis 0 in the caller's framework (the MAP head's q and kv).
    Every key must be a parameter of this architecture (or a known non-parameter entry)."""
    src = "open_clip checkpoint"
    state = {
        k: v for k, v in oc_state.items() if k not in _OC_IGNORED and not k.endswith(_OC_IGNORED_SUFFIXES)
    }
    mapping = timm_key_map(cfg, head_of(state))
    used, out = set(), {}
    for ours, theirs in mapping.items():
        if theirs not in state:
            raise _key_error(src, "missing", [theirs])
        x, used = state[theirs], used | {theirs}
        if ours in CONV_KEYS:
            x = _permute(x, OIHW_TO_OHWI)
        elif ours == "text.text_projection.weight":
            if len(_shape(x)) != 2:
                raise WeightError(
                    f"{src}: key '{theirs}' has shape {_shape(x)}, expected a (width, embed) matrix"
                )
            x = _permute(x, (1, 0))
        elif ours in _LEADING_ONES:
            n = _LEADING_ONES[ours]
            if _shape(x)[:n] != (1,) * n:
                raise WeightError(f"{src}: key '{theirs}' has shape {_shape(x)}, expected {n} leading 1s")
            x = x.reshape(_shape(x)[n:])
        elif ours in ("logit_scale", BIAS_KEY) and _shape(x) == (1,):
            x = x.reshape(())  # open_clip's nonscalar_logit_scale
        out[ours] = x
    if cfg.vision_pool == "map":
        for ours, p in zip(_IN_PROJ, _LN, strict=True):
            keys = [f"{TRUNK}attn_pool.q.{p}", f"{TRUNK}attn_pool.kv.{p}"]
            for k in keys:
                if k not in state:
                    raise _key_error(src, "missing", [k])
            out[ours], used = concat([state[k] for k in keys]), used | set(keys)
    extra = sorted(set(state) - used)
    if extra == [BIAS_KEY]:
        raise _key_error(src, "unexpected", extra)
    if extra:
        raise WeightError(f"{src}: unexpected key '{extra[0]}' (not part of this architecture)")
    return out
