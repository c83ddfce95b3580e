"""canonical <-> Hugging Face transformers SiglipModel weights.

SiglipModel's encoder blocks are CLIPModel's (q/k/v split, the same block names), so the blocks, the
q/k/v split and the conv layout come from layouts.py; this file holds what differs:

* the vision tower has no class token and no ln_pre, a patch-embedding bias, and its pooling head
  (`vision_model.head`) is a torch MultiheadAttention, whose in_proj_weight (3W, W: q, k, v rows)
  is our `visual.attn_pool.attn.in_proj.weight` as it is;
* the text tower ends in `text_model.head` (a Linear with bias), and neither tower has a projection;
* logit_scale and logit_bias are shape (1,) there, scalars here.

Siglip2Model (NaFlex) has the same keys; its patch embedding is a Linear (W, p*p*C) on patches
flattened in (row, column, channel) order, which is our (W, p, p, C) conv weight reshaped.

Like layouts.py, this imports no framework: numpy, MLX and torch arrays pass through alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .layouts import BIAS_KEY, OHWI_TO_OIHW, WeightError, _from_hf, _permute, _shape, _to_hf

_SIGLIP_TOP = {
    "visual.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.patch_embed.bias": "vision_model.embeddings.patch_embedding.bias",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.attn_pool.probe": "vision_model.head.probe",
    "visual.attn_pool.attn.in_proj.weight": "vision_model.head.attention.in_proj_weight",
    "visual.attn_pool.attn.in_proj.bias": "vision_model.head.attention.in_proj_bias",
    "visual.attn_pool.attn.out_proj.weight": "vision_model.head.attention.out_proj.weight",
    "visual.attn_pool.attn.out_proj.bias": "vision_model.head.attention.out_proj.bias",
    "visual.attn_pool.norm.weight": "vision_model.head.layernorm.weight",
    "visual.attn_pool.norm.bias": "vision_model.head.layernorm.bias",
    "visual.attn_pool.mlp.c_fc.weight": "vision_model.head.mlp.fc1.weight",
    "visual.attn_pool.mlp.c_fc.bias": "vision_model.head.mlp.fc1.bias",
    "visual.attn_pool.mlp.c_proj.weight": "vision_model.head.mlp.fc2.weight",
    "visual.attn_pool.mlp.c_proj.bias": "vision_model.head.mlp.fc2.bias",
    "text.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "text.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text.head.weight": "text_model.head.weight",
    "text.head.bias": "text_model.head.bias",
    "logit_scale": "logit_scale",
    BIAS_KEY: BIAS_KEY,
}
_SCALARS = ("logit_scale", BIAS_KEY)  # (1,) in SiglipModel, () in the canonical file


def canonical_to_hf_siglip(state: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    """Canonical weights of a SigLIP-shaped model (hf_config.hf_class(cfg) is "SiglipModel") -> a
    transformers SiglipModel state dict (same array type); nothing is dropped."""
    for key in _SCALARS:
        if key not in state:
            raise WeightError(f"canonical weights: missing key '{key}' (SiglipModel has one)")
    out = _to_hf(state, cfg, _SIGLIP_TOP)
    for key in _SCALARS:
        out[key] = out[key].reshape((1,))
    return out


def hf_siglip_to_canonical(
    hf_state: Mapping[str, Any], cfg: Any, concat, naflex: bool = False
) -> dict[str, Any]:
    """A transformers SiglipModel (naflex: Siglip2Model) state dict -> canonical weights; every key
    must be used, and a missing or unexpected one is named. `concat` joins along axis 0 (as
    layouts.hf_to_canonical)."""
    state = dict(hf_state)
    patch = _SIGLIP_TOP["visual.patch_embed.weight"]
    if naflex and patch in state:
        w, p = state[patch], cfg.patch_size
        if _shape(w) != (cfg.vision_width, p * p * 3):
            raise WeightError(
                f"Hugging Face checkpoint: key '{patch}' has shape {_shape(w)}, the Siglip2 config "
                f"expects a Linear ({cfg.vision_width}, {p * p * 3})"
            )
        state[patch] = _permute(w.reshape(cfg.vision_width, p, p, 3), OHWI_TO_OIHW)  # as a conv's
    for key in _SCALARS:
        if key in state:
            if _shape(state[key]) not in ((), (1,)):
                raise WeightError(
                    f"Hugging Face checkpoint: key '{key}' has shape {_shape(state[key])}, expected (1,)"
                )
            state[key] = state[key].reshape(())
    return _from_hf(state, cfg, concat, _SIGLIP_TOP)
