"""Hugging Face SiglipModel config.json <-> ModelConfig, and which transformers class (CLIPModel or
SiglipModel) can hold a given ModelConfig.

transformers' SiglipModel (model_type "siglip") is, in ModelConfig's terms: no class token and
attention pooling (vision_pool "map"), a patch-embedding bias, no ln_pre, no vision projection (the
pooled feature is the embedding, so embed_dim = vision_config.hidden_size), a bidirectional text
tower pooled at the last position and ended by a Linear head with bias (text_config.projection_size
outputs), and a learnable logit_bias. Google's published SigLIP checkpoints and the fixed-resolution
SigLIP 2 ones saved as model_type "siglip" import; "siglip2" (NaFlex) is refused with the reason.
The weights' keys are layouts_siglip.py's.
"""

from __future__ import annotations

import math

from ..models.config import SIZE_LIMITS, ModelConfig
from ..schema import ConfigError
from .hf import _HF_SIZES, _hf_sizes, _mlp_fields, _shared_settings, _size, _towers
from .layouts import HF_ACTIVATIONS

# transformers' SiglipTextConfig / SiglipVisionConfig defaults (used when config.json omits a field).
_TEXT_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=64,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    projection_size=None,  # None: hidden_size
)
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=True,
)
_KINDS = ("siglip_text_model", "siglip_vision_model")
# The ModelConfig options each transformers class builds (its towers' fixed shape).
CLIP_SHAPE = dict(
    vision_pool="cls",
    patch_bias=False,
    vision_pre_norm=True,
    vision_proj=True,
    text_causal=True,
    text_pool="argmax",
    text_proj="proj",
)
SIGLIP_SHAPE = dict(
    vision_pool="map",
    patch_bias=True,
    vision_pre_norm=False,
    vision_proj=False,
    text_causal=False,
    text_pool="last",
    text_proj="head",
)
# SigLIP's initial temperature and bias (the paper's log 10 and -10); the weights carry the trained values.
SIGLIP_INIT = dict(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)

SIGLIP2_REFUSED = (
    "{where}: model_type='siglip2' is transformers' Siglip2Model (NaFlex): its patch embedding is a "
    "Linear on flattened patches of any aspect ratio, and its position embeddings are resized to each "
    "image's patch grid at run time; mlx_clip's ViT has a fixed resolution (a conv patch embedding and "
    "one position grid), so these weights do not map. Use a fixed-resolution SigLIP 2 checkpoint: "
    "open_clip's / timm's (e.g. ViT-B-16-SigLIP2-256: python -m mlx_clip.convert --from open_clip) or "
    "a Hugging Face directory saved with model_type 'siglip' (SiglipModel)"
)


def siglip_model_config(config: dict, where: str = "config.json") -> ModelConfig:
    """A transformers SiglipModel config.json -> ModelConfig; what our model cannot express is an
    error that names the field."""
    if config.get("model_type") == "siglip2":
        raise ConfigError(SIGLIP2_REFUSED.format(where=where))
    text, vision = _towers(config, (_TEXT_DEFAULTS, _VISION_DEFAULTS), _KINDS, where)
    if vision["vision_use_head"] is not True:
        raise ConfigError(
            f"{where}: vision_config.vision_use_head={vision['vision_use_head']!r}: without its "
            "attention-pooling head the vision tower has no pooled feature; mlx_clip's SigLIP pools "
            "with it (vision_pool 'map')"
        )
    sizes = _hf_sizes(config, text, vision, where, table=_HF_SIZES[1:])  # no projection_dim
    width = sizes["vision_width"]
    out = text["projection_size"] if text["projection_size"] is not None else text["hidden_size"]
    if _size(out, "text_config.projection_size", SIZE_LIMITS["embed_dim"], where) != width:
        raise ConfigError(
            f"{where}: text_config.projection_size={out} differs from vision_config.hidden_size={width}: "
            "SiglipModel compares the text head's output with the pooled image feature, one size"
        )
    cfg = ModelConfig(
        embed_dim=width,
        **sizes,
        **SIGLIP_SHAPE,
        **_mlp_fields(text, vision, shared_ratio=False),
        **_shared_settings(text, vision, where),
        **SIGLIP_INIT,
    )
    cfg.validate(f"{where}: model")
    return cfg


def siglip_config_json(cfg: ModelConfig) -> dict:
    """A SigLIP-shaped ModelConfig -> a config.json that transformers.SiglipModel.from_pretrained reads."""
    act = HF_ACTIVATIONS[cfg.activation]
    text = dict(
        model_type=_KINDS[0],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_width,
        intermediate_size=cfg.mlp_hidden("text"),
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.context_length,
        hidden_act=act,
        layer_norm_eps=cfg.layer_norm_eps,
        projection_size=cfg.embed_dim,
        # the model reads no token id (it pools the last position): the tokenizer files hold them
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    vision = dict(
        model_type=_KINDS[1],
        hidden_size=cfg.vision_width,
        intermediate_size=cfg.mlp_hidden("vision"),
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        num_channels=3,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_act=act,
        layer_norm_eps=cfg.layer_norm_eps,
        vision_use_head=True,
    )
    return {
        "architectures": ["SiglipModel"],
        "model_type": "siglip",
        "initializer_factor": 1.0,
        "dtype": "float32",
        "text_config": text,
        "vision_config": vision,
    }


def _misfits(cfg: ModelConfig, shape: dict) -> list[str]:
    return [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in shape.items() if getattr(cfg, k) != v]


def hf_class(cfg: ModelConfig) -> str:
    """ "CLIPModel" or "SiglipModel": the transformers class whose towers are this model's. A CLIP-
    shaped model with a logit_bias is "CLIPModel" (layouts.canonical_to_hf refuses it, saying why).
    A model neither can hold is a ConfigError naming the options that do not fit each."""
    clip, siglip = _misfits(cfg, CLIP_SHAPE), _misfits(cfg, SIGLIP_SHAPE)
    if not clip:
        return "CLIPModel"
    if cfg.init_logit_bias is None:
        siglip.append("init_logit_bias=None (needs a logit_bias: SiglipModel has one)")
    if not siglip:
        return "SiglipModel"
    raise ConfigError(
        "--to hf: neither transformers' CLIPModel nor SiglipModel has this model's towers. For CLIPModel, "
        f"{', '.join(clip)}; for SiglipModel, {', '.join(siglip)}. Export with --to torch_ref (any "
        "mlx_clip model) or --to open_clip instead"
    )
