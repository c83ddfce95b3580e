"""The one place where weight layouts and key names change.

The canonical format is what `mlx_clip.save_weights` writes: safetensors whose
keys are the attribute paths of mlx_clip.model.CLIP (torch_ref uses the same
names) and whose tensors have MLX layouts. The only layout that differs from
PyTorch is the patch-embedding conv: MLX (out, kh, kw, in) vs torch (out, in, kh, kw).

Functions here take and return plain dicts of arrays and work on numpy, MLX and
torch tensors alike, so this module imports no framework.
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


def check_state(expected: Mapping[str, tuple], state: Mapping[str, Any], source: str) -> None:
    """Strict load check: same key set, same shapes; errors name the key and the file."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise WeightError(
            f"{source}: missing key '{missing[0]}'"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if extra:
        raise WeightError(
            f"{source}: unexpected key '{extra[0]}'"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
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


def _hf_key_map(num_layers: dict[str, int]) -> dict[str, str]:
    """canonical key -> HF key, for every non-qkv tensor."""
    mapping = dict(_HF_TOP)
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


def canonical_to_hf(state: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    """Canonical weights -> a transformers CLIPModel state dict (same array type)."""
    out: dict[str, Any] = {}
    for ours, theirs in _hf_key_map(_layers_of(cfg)).items():
        out[theirs] = state[ours]
    out["vision_model.embeddings.patch_embedding.weight"] = _permute(
        state["visual.patch_embed.weight"], OHWI_TO_OIHW
    )
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
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(_HF_IGNORED_SUFFIXES)}
    mapping = _hf_key_map(_layers_of(cfg))
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


def hf_config_kwargs(cfg: Any) -> dict[str, dict]:
    """Keyword arguments for transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig."""
    text = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_width,
        intermediate_size=int(cfg.text_width * cfg.mlp_ratio),
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.context_length,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.embed_dim,
        # eos_token_id=2 selects HF's legacy argmax pooling, which is CLIP's.
        bos_token_id=cfg.vocab_size - 2,
        eos_token_id=2,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=cfg.vision_width,
        intermediate_size=int(cfg.vision_width * cfg.mlp_ratio),
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        projection_dim=cfg.embed_dim,
    )
    return {"text_config": text, "vision_config": vision, "projection_dim": cfg.embed_dim}
