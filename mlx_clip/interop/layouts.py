"""The one place where weight layouts and key names change.

The canonical format is what `mlx_clip.save_weights` writes: safetensors whose
keys are the attribute paths of mlx_clip.models.model.CLIP (torch_ref uses the same
names) and whose tensors have MLX layouts. The only layout that differs from
PyTorch is the patch-embedding conv: MLX (out, kh, kw, in) vs torch (out, in, kh, kw).

Functions here take and return plain dicts of arrays and work on numpy, MLX and
torch tensors alike, so this module imports no framework. Mappings: torch_ref (conv
layout only), Hugging Face transformers (CLIPModel; SiglipModel in layouts_siglip.py, which reuses
the block and q/k/v helpers here) and open_clip (layouts_timm.py: open_clip models with a timm ViT
image tower, SigLIP and MobileCLIP2-L/14). Reading and writing files lives beside it
(files.py, hf.py, open_clip.py); the CLI is `python -m mlx_clip.convert`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Conv weights: canonical/MLX OHWI <-> PyTorch OIHW.
CONV_KEYS = ("visual.patch_embed.weight",)
OHWI_TO_OIHW = (0, 3, 1, 2)
OIHW_TO_OHWI = (0, 2, 3, 1)


def _permute(x: Any, axes: tuple[int, ...]) -> Any:
    if hasattr(x, "permute"):  # torch.Tensor
        return x.permute(*axes).contiguous()
    return x.transpose(axes)  # numpy / mlx


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


class WeightError(ValueError):
    """A checkpoint does not fit the model: the message names the key."""


# SigLIP's learnable bias (a scalar, canonical key "logit_bias") exists only in a model whose
# ModelConfig sets init_logit_bias; a mismatch is a model built from the wrong config.
BIAS_KEY = "logit_bias"
_BIAS_HINTS = {
    "missing": " (the model config sets init_logit_bias, so the model has SigLIP's logit_bias, and "
    "these weights have none: the config and the weights do not belong together)",
    "unexpected": " (these weights have SigLIP's logit_bias, and the model config sets no "
    "init_logit_bias: build the model from the checkpoint's own config; loss.type siglip sets it)",
}


def has_logit_bias(cfg: Any) -> bool:
    return getattr(cfg, "init_logit_bias", None) is not None


def _key_error(source: str, kind: str, keys: list[str]) -> WeightError:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    hint = _BIAS_HINTS[kind] if keys == [BIAS_KEY] else ""
    return WeightError(f"{source}: {kind} key '{keys[0]}'{more}{hint}")


def check_state(expected: Mapping[str, tuple], state: Mapping[str, Any], source: str) -> None:
    """Strict load check: same key set, same shapes; errors name the key and the file."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise _key_error(source, "missing", missing)
    if extra:
        raise _key_error(source, "unexpected", extra)
    for key, shape in expected.items():
        got = _shape(state[key])
        if got != tuple(shape):
            raise WeightError(f"{source}: key '{key}' has shape {got}, the model expects {tuple(shape)}")


# ---------------------------------------------------------------------------
# canonical <-> torch_ref


def canonical_to_torch(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    for key in CONV_KEYS:
        if key in out:
            out[key] = _permute(out[key], OHWI_TO_OIHW)
    return out


def torch_to_canonical(state: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(state)
    for key in CONV_KEYS:
        if key in out:
            out[key] = _permute(out[key], OIHW_TO_OHWI)
    return out


# ---------------------------------------------------------------------------
# canonical <-> Hugging Face transformers CLIPModel
#
# HF splits the fused qkv projection into q/k/v and stores the conv in OIHW.
# Every other tensor maps one to one under a renamed key.

_HF_BLOCK = {
    # canonical suffix -> HF suffix, inside one residual block
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_HF_TOP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj.weight": "visual_projection.weight",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text.text_projection.weight": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_HF_TOWER = {"visual": "vision_model", "text": "text_model"}
# Non-parameter buffers HF may put in a state dict.
_HF_IGNORED_SUFFIXES = ("position_ids",)


def _hf_key_map(num_layers: dict[str, int], top: Mapping[str, str] = _HF_TOP) -> dict[str, str]:
    """canonical key -> HF key, for every non-qkv tensor (`top`: the tensors outside the blocks)."""
    mapping = dict(top)
    for tower, hf_tower in _HF_TOWER.items():
        for i in range(num_layers[tower]):
            ours = f"{tower}.transformer.resblocks.{i}"
            theirs = f"{hf_tower}.encoder.layers.{i}"
            for a, b in _HF_BLOCK.items():
                for p in ("weight", "bias"):
                    mapping[f"{ours}.{a}.{p}"] = f"{theirs}.{b}.{p}"
    return mapping


def _layers_of(cfg: Any) -> dict[str, int]:
    return {"visual": cfg.vision_layers, "text": cfg.text_layers}


HF_NO_LOGIT_BIAS = (
    "logit_bias: this model has SigLIP's learnable logit bias (model.init_logit_bias={init}, trained "
    "value {value}), and transformers' CLIPModel has no such parameter: without it the exported "
    "model's logits (logit_scale * cosine) and sigmoid probabilities would not be this model's. "
    "Export with --to open_clip (open_clip's CLIP keeps logit_bias) or --to torch_ref instead "
    "(--to hf writes a SiglipModel, which has the bias, for SigLIP's towers only)."
)


def canonical_to_hf(state: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    """Canonical weights -> a transformers CLIPModel state dict (same array type).

    A SigLIP model (with logit_bias) is refused: CLIPModel has no bias, and dropping it would
    change the model's logits."""
    if has_logit_bias(cfg) or BIAS_KEY in state:
        value = f"{float(state[BIAS_KEY]):g}" if BIAS_KEY in state else "unknown"
        init = getattr(cfg, "init_logit_bias", None)
        raise WeightError(HF_NO_LOGIT_BIAS.format(init=init, value=value))
    return _to_hf(state, cfg, _HF_TOP)


def _to_hf(state: Mapping[str, Any], cfg: Any, top: Mapping[str, str]) -> dict[str, Any]:
    """Canonical -> HF keys (CLIPModel's or SiglipModel's `top`): q/k/v split, conv to OIHW."""
    mapping = _hf_key_map(_layers_of(cfg), top)
    qkv = (".attn.in_proj.weight", ".attn.in_proj.bias")
    fused = {k for k in state if k.endswith(qkv) and k not in mapping}
    extra = sorted(set(state) - set(mapping) - fused)
    if extra:  # nothing is dropped on the way out
        raise _key_error("canonical weights", "unexpected", extra)
    out: dict[str, Any] = {}
    for ours, theirs in mapping.items():
        out[theirs] = state[ours]
    out[mapping["visual.patch_embed.weight"]] = _permute(state["visual.patch_embed.weight"], OHWI_TO_OIHW)
    for tower, hf_tower in _HF_TOWER.items():
        for i in range(_layers_of(cfg)[tower]):
            w = state[f"{tower}.transformer.resblocks.{i}.attn.in_proj.weight"]
            b = state[f"{tower}.transformer.resblocks.{i}.attn.in_proj.bias"]
            d = _shape(w)[1]
            for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{hf_tower}.encoder.layers.{i}.self_attn.{name}.weight"] = w[j * d : (j + 1) * d]
                out[f"{hf_tower}.encoder.layers.{i}.self_attn.{name}.bias"] = b[j * d : (j + 1) * d]
    return out


def hf_to_canonical(hf_state: Mapping[str, Any], cfg: Any, concat) -> dict[str, Any]:
    """A transformers CLIPModel state dict -> canonical weights.

    `concat(list_of_arrays)` joins along axis 0 in the caller's framework
    (np.concatenate, mx.concatenate or torch.cat), so no framework is imported here.
    """
    return _from_hf(hf_state, cfg, concat, _HF_TOP)


def _from_hf(hf_state: Mapping[str, Any], cfg: Any, concat, top: Mapping[str, str]) -> dict[str, Any]:
    """HF keys (CLIPModel's or SiglipModel's `top`) -> canonical: q/k/v fused, conv to OHWI."""
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(_HF_IGNORED_SUFFIXES)}
    mapping = _hf_key_map(_layers_of(cfg), top)
    used = set()
    out: dict[str, Any] = {}
    for ours, theirs in mapping.items():
        if theirs not in hf_state:
            raise WeightError(f"Hugging Face checkpoint: missing key '{theirs}'")
        out[ours] = hf_state[theirs]
        used.add(theirs)
    out["visual.patch_embed.weight"] = _permute(out["visual.patch_embed.weight"], OIHW_TO_OHWI)
    for tower, hf_tower in _HF_TOWER.items():
        for i in range(_layers_of(cfg)[tower]):
            for p in ("weight", "bias"):
                keys = [
                    f"{hf_tower}.encoder.layers.{i}.self_attn.{n}.{p}" for n in ("q_proj", "k_proj", "v_proj")
                ]
                for k in keys:
                    if k not in hf_state:
                        raise WeightError(f"Hugging Face checkpoint: missing key '{k}'")
                out[f"{tower}.transformer.resblocks.{i}.attn.in_proj.{p}"] = concat(
                    [hf_state[k] for k in keys]
                )
                used.update(keys)
    extra = sorted(set(hf_state) - used)
    if extra:
        raise WeightError(
            f"Hugging Face checkpoint: unexpected key '{extra[0]}' (not part of this architecture)"
        )
    return out


# ---------------------------------------------------------------------------
# canonical <-> open_clip CLIP (the OpenAI layout)
#
# open_clip keeps the text tower at the top level (CustomTextCLIP nests it under "text."),
# stores the fused qkv as in_proj_weight / in_proj_bias, the conv in OIHW and both
# projections as (width, embed) matrices applied as x @ P, i.e. the transpose of our Linear.
# A model built with init_logit_bias (SigLIP) has "logit_bias" beside "logit_scale"; with
# nonscalar_logit_scale both are shape (1,) instead of scalars.

_OC_TOP = {
    "visual.patch_embed.weight": "visual.conv1.weight",
    "visual.class_embedding": "visual.class_embedding",
    "visual.positional_embedding": "visual.positional_embedding",
    "visual.ln_pre.weight": "visual.ln_pre.weight",
    "visual.ln_pre.bias": "visual.ln_pre.bias",
    "visual.ln_post.weight": "visual.ln_post.weight",
    "visual.ln_post.bias": "visual.ln_post.bias",
    "visual.proj.weight": "visual.proj",
    "text.token_embedding.weight": "{t}token_embedding.weight",
    "text.positional_embedding": "{t}positional_embedding",
    "text.ln_final.weight": "{t}ln_final.weight",
    "text.ln_final.bias": "{t}ln_final.bias",
    "text.text_projection.weight": "{t}text_projection",
    "logit_scale": "logit_scale",
}
_OC_TRANSPOSED = ("visual.proj.weight", "text.text_projection.weight")
_OC_BLOCK = {
    # canonical suffix -> open_clip suffix, inside one residual block
    **{
        f"{m}.{p}": f"{m}.{p}"
        for m in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
        for p in ("weight", "bias")
    },
    "attn.in_proj.weight": "attn.in_proj_weight",
    "attn.in_proj.bias": "attn.in_proj_bias",
}
# Entries of a state dict that are not parameters: the causal-mask buffer (older open_clip
# saved it) and the scalars OpenAI's JIT archives carry.
_OC_IGNORED = ("input_resolution", "context_length", "vocab_size")
_OC_IGNORED_SUFFIXES = ("attn_mask",)


def _oc_key_map(num_layers: dict[str, int], text_prefix: str = "", bias: bool = False) -> dict[str, str]:
    """canonical key -> open_clip key. text_prefix is "" (CLIP) or "text." (CustomTextCLIP);
    bias: the model has SigLIP's logit_bias."""
    mapping = {ours: theirs.format(t=text_prefix) for ours, theirs in _OC_TOP.items()}
    if bias:
        mapping[BIAS_KEY] = BIAS_KEY
    towers = {"visual": "visual.transformer", "text": f"{text_prefix}transformer"}
    for tower, theirs in towers.items():
        for i in range(num_layers[tower]):
            for a, b in _OC_BLOCK.items():
                mapping[f"{tower}.transformer.resblocks.{i}.{a}"] = f"{theirs}.resblocks.{i}.{b}"
    return mapping


def canonical_to_open_clip(state: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    """Canonical weights -> an open_clip `CLIP` state dict (same array type); logit_scale and
    logit_bias stay scalars (open_clip's default, nonscalar_logit_scale False)."""
    mapping = _oc_key_map(_layers_of(cfg), bias=has_logit_bias(cfg))
    extra = sorted(set(state) - set(mapping))
    if extra:  # nothing is dropped on the way out
        raise _key_error("canonical weights", "unexpected", extra)
    out = {}
    for ours, theirs in mapping.items():
        x = state[ours]
        if ours in CONV_KEYS:
            x = _permute(x, OHWI_TO_OIHW)
        elif ours in _OC_TRANSPOSED:
            x = _permute(x, (1, 0))
        out[theirs] = x
    return out


def open_clip_to_canonical(oc_state: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    """An open_clip CLIP / CustomTextCLIP state dict -> canonical weights.

    Every key must be a parameter of this architecture or one of the known non-parameter
    entries (_OC_IGNORED, *attn_mask); anything else is an error that names it.
    """
    src = "open_clip checkpoint"
    state = {
        k: v for k, v in oc_state.items() if k not in _OC_IGNORED and not k.endswith(_OC_IGNORED_SUFFIXES)
    }
    text_prefix = "text." if "text.token_embedding.weight" in state else ""
    mapping = _oc_key_map(_layers_of(cfg), text_prefix, bias=has_logit_bias(cfg))
    out = {}
    for ours, theirs in mapping.items():
        if theirs not in state:
            raise _key_error(src, "missing", [theirs])
        x = state[theirs]
        if ours in CONV_KEYS:
            x = _permute(x, OIHW_TO_OHWI)
        elif ours in _OC_TRANSPOSED:
            if len(_shape(x)) != 2:
                raise WeightError(f"{src}: key '{theirs}' has shape {_shape(x)}, expected a matrix")
            x = _permute(x, (1, 0))
        elif ours in ("logit_scale", BIAS_KEY) and _shape(x) == (1,):
            x = x.reshape(())  # open_clip's nonscalar_logit_scale
        out[ours] = x
    extra = sorted(set(state) - set(mapping.values()))
    if extra == [BIAS_KEY]:
        raise _key_error(src, "unexpected", extra)
    if extra:
        raise WeightError(f"{src}: unexpected key '{extra[0]}' (not part of this architecture)")
    return out


# ---------------------------------------------------------------------------
# Fine-tuning at a new image size: resample the vision position grid.


def _cubic_weights(in_size: int, out_size: int, a: float = -0.75):
    """(out_size, 4) source indices and bicubic weights, half-pixel centres, edge-clamped
    (the convention of torch.nn.functional.interpolate(mode="bicubic", align_corners=False))."""
    import numpy as np

    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    base = np.floor(src).astype(np.int64)
    t = src - base
    # Keys' cubic convolution kernel evaluated at distances 1+t, t, 1-t, 2-t.
    d = np.stack([1 + t, t, 1 - t, 2 - t], axis=1)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    w = np.where(d <= 1, near, far)
    idx = np.clip(base[:, None] + np.arange(-1, 3), 0, in_size - 1)
    return idx, w


def resample_matrix(grid: int, new_grid: tuple[int, int]):
    """(nh*nw, g*g) float64 matrix M with M @ rows = the g x g position grid (rows in row-major
    order) resampled bicubically to nh x nw: the separable row and column weights as one Kronecker
    product. The one definition of that resampling: resize_positional_embedding applies it to a
    checkpoint on the host (fine-tuning at another size), the vision tower to its own grid on the
    fly (models/transformer.py: training or inference at another image size)."""
    import numpy as np

    def axis(n: int):  # (n, g): each output row's four weights, summed where edge clamping repeats
        idx, w = _cubic_weights(grid, n)
        out = np.zeros((n, grid))
        np.add.at(out, (np.arange(n)[:, None], idx), w)
        return out

    return np.kron(axis(new_grid[0]), axis(new_grid[1]))


def resize_positional_embedding(pe, new_grid: int, class_token: bool = True):
    """(1 + g*g, W) position embedding (class token first; g*g rows without one) -> (1 + n*n, W)
    by bicubic resampling of the g x g grid, as open_clip and timm do when a model is fine-tuned
    at another image size."""
    import numpy as np

    pe = np.asarray(pe, dtype=np.float32)
    lead = int(class_token)
    cls, grid = pe[:lead], pe[lead:]
    g = int(round((grid.shape[0]) ** 0.5))
    if g * g != grid.shape[0]:
        raise WeightError(f"visual.positional_embedding has {grid.shape[0]} grid rows, not a square")
    if g == new_grid:
        return pe
    resized = resample_matrix(g, (new_grid, new_grid)) @ grid.astype(np.float64)  # (n*n, W)
    return np.concatenate([cls, resized.astype(np.float32)])
