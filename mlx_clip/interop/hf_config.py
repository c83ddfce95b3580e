"""Hugging Face config.json <-> ModelConfig, for transformers' CLIPModel and SiglipModel, and which
of the two classes can hold a given ModelConfig (hf_class).

CLIPModel (model_type "clip") is ModelConfig's defaults: class token, ln_pre, causal text pooled at
the EOT token, projections without bias; each tower's intermediate_size is its MLP width (one
mlp_ratio where both towers share it, else vision_mlp_dim / text_mlp_dim).

SiglipModel (model_type "siglip") is, in ModelConfig's terms: no class token and attention pooling
(vision_pool "map"), a patch-embedding bias, no ln_pre, no vision projection (the pooled feature is
the embedding, so embed_dim = vision_config.hidden_size), a bidirectional text tower pooled at the
last position and ended by a Linear head with bias (text_config.projection_size outputs), and a
learnable logit_bias. Google's SigLIP checkpoints and the fixed-resolution SigLIP 2 ones (model_type
"siglip") import as they are. A "siglip2" (NaFlex) Siglip2Model has the same towers, with its patch
embedding as a Linear on flattened (row, column, channel) patches, our conv's layout, and a square
position grid that transformers resizes to each image's patch grid: it imports for use at the fixed
resolution of that grid (num_patches = 256, patch 16: 256 px), where the resize is the identity and
a square image gives transformers' features (NAFLEX_NOTE); it exports as SiglipModel.

Each tower keeps its own hidden_act (ModelConfig's activation and vision_activation). A SigLIP
config gets SigLIP's preprocessing (SIGLIP_PREPROCESSING: squash, bicubic, mean/std 0.5), what
SiglipImageProcessor does by default; hf.py replaces it with the directory's preprocessor_config.json
when there is one. Anything our model cannot express (another tower model_type, vision_use_head
false, a layer_norm_eps per tower, num_channels != 3, ...) is an error that names the field. The weights' keys
are layouts.py's (CLIPModel) and layouts_siglip.py's (SiglipModel).
"""

from __future__ import annotations

import math

from ..models.config import SIZE_LIMITS, ModelConfig
from ..schema import ConfigError
from .preprocess import SIGLIP_PREPROCESSING

# transformers' CLIPTextConfig / CLIPVisionConfig defaults (used when config.json omits a field).
_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    eos_token_id=49407,
)
_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
# transformers' SiglipTextConfig / SiglipVisionConfig defaults (used when config.json omits a field).
_SIGLIP_TEXT_DEFAULTS = dict(
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
_SIGLIP_VISION_DEFAULTS = dict(
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

# ModelConfig's sizes in config.json: field, section ("" is the top level), key.
_HF_SIZES = (
    ("embed_dim", "", "projection_dim"),
    ("image_size", "vision_config", "image_size"),
    ("patch_size", "vision_config", "patch_size"),
    ("vision_width", "vision_config", "hidden_size"),
    ("vision_layers", "vision_config", "num_hidden_layers"),
    ("vision_heads", "vision_config", "num_attention_heads"),
    ("context_length", "text_config", "max_position_embeddings"),
    ("vocab_size", "text_config", "vocab_size"),
    ("text_width", "text_config", "hidden_size"),
    ("text_layers", "text_config", "num_hidden_layers"),
    ("text_heads", "text_config", "num_attention_heads"),
)


def _section(config: dict, key: str, where: str) -> dict:
    """A tower's section of config.json (or its older `_dict` spelling); {} when absent."""
    value = config.get(key) or config.get(f"{key}_dict") or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {type(value).__name__}")
    return value


def _size(value, name: str, limit: int, where: str) -> int:
    """A size from config.json: a positive integer up to `limit` (image and patch sizes may be a
    square pair), checked before any arithmetic or allocation uses it."""
    if name.endswith(("image_size", "patch_size")) and isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"{where}: {name}={value}: only square images and patches are supported")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ConfigError(f"{where}: {name} must be an integer in [1, {limit}], got {value!r}")
    return value


def _hf_sizes(config: dict, text: dict, vision: dict, where: str, table=_HF_SIZES) -> dict:
    """The ModelConfig sizes of a config.json (`table`: field, section, key), each checked under its key."""
    sections = {"": {"projection_dim": 512, **config}, "text_config": text, "vision_config": vision}
    sizes = {
        field: _size(sections[section][key], f"{section}.{key}".lstrip("."), SIZE_LIMITS[field], where)
        for field, section, key in table
    }
    for section in ("text_config", "vision_config"):  # divided by the width below, for the MLP ratio
        limit = SIZE_LIMITS["vision_width"] * 64
        _size(sections[section]["intermediate_size"], f"{section}.intermediate_size", limit, where)
    return sizes


def _towers(config: dict, defaults: tuple[dict, dict], kinds: tuple[str, str], where: str):
    """(text, vision) sections with the class's defaults filled in; a tower of another model_type
    (an XLM-R text model, say) is refused by name."""
    towers = []
    for key, default, kind in zip(("text_config", "vision_config"), defaults, kinds, strict=True):
        section = _section(config, key, where)
        got = section.get("model_type", kind)
        if got != kind:
            raise ConfigError(
                f"{where}: {key}.model_type={got!r}; mlx_clip builds the {kind!r} tower of this "
                "class only (another text or vision model is another architecture)"
            )
        towers.append({**default, **section})
    return towers


def _activations(text: str, vision: str) -> dict:
    """ModelConfig's activation fields for the towers' (our-named) activations: one shared
    `activation` where they agree, else the text tower's plus a vision_activation override."""
    if text == vision:
        return {"activation": text}
    return {"activation": text, "vision_activation": vision}


def _shared_settings(text: dict, vision: dict, where: str) -> dict:
    """Each tower's activation (_activations), one layer_norm_eps for both towers (mlx_clip has
    one); RGB input."""
    t, v = "text_config", "vision_config"
    ours = {theirs: name for name, theirs in HF_ACTIVATIONS.items()}
    for tower, c in ((t, text), (v, vision)):
        if c["hidden_act"] not in ours:
            raise ConfigError(
                f"{where}: {tower}.hidden_act={c['hidden_act']!r}; mlx_clip supports "
                + " and ".join(map(repr, ours))
            )
        eps = c["layer_norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise ConfigError(f"{where}: {tower}.layer_norm_eps must be a number, got {eps!r}")
    if text["layer_norm_eps"] != vision["layer_norm_eps"]:
        raise ConfigError(f"{where}: {t}.layer_norm_eps differs from {v}.layer_norm_eps; mlx_clip uses one")
    if vision["num_channels"] != 3:
        raise ConfigError(f"{where}: {v}.num_channels={vision['num_channels']}; only RGB (3) is supported")
    acts = _activations(ours[text["hidden_act"]], ours[vision["hidden_act"]])
    return {**acts, "layer_norm_eps": float(text["layer_norm_eps"])}


def _mlp_fields(text: dict, vision: dict, shared_ratio: bool) -> dict:
    """The towers' MLP widths as ModelConfig fields: one mlp_ratio where both towers share it
    (shared_ratio, CLIP's imports as before), else mlp_ratio 4 and a {tower}_mlp_dim for each tower
    whose intermediate_size is not 4x its width."""
    ratio = text["intermediate_size"] / text["hidden_size"]
    if shared_ratio and all(int(c["hidden_size"] * ratio) == c["intermediate_size"] for c in (text, vision)):
        return {"mlp_ratio": ratio}
    dims = {
        f"{tower}_mlp_dim": c["intermediate_size"]
        for tower, c in (("vision", vision), ("text", text))
        if int(c["hidden_size"] * 4.0) != c["intermediate_size"]
    }
    return {"mlp_ratio": 4.0, **dims}


def hf_model_config(config: dict, where: str = "config.json") -> ModelConfig:
    """A transformers CLIPModel or SiglipModel config (the parsed config.json) -> ModelConfig; a
    variant our model cannot express, or a value out of range, is an error that names the field."""
    if not isinstance(config, dict):
        raise ConfigError(
            f"{where}: expected a JSON object (a CLIPModel or SiglipModel config), "
            f"got {type(config).__name__}"
        )
    if config.get("model_type") in ("siglip", "siglip2"):
        return _siglip_model_config(config, where)
    if config.get("model_type") != "clip":
        raise ConfigError(
            f"{where}: model_type={config.get('model_type')!r}; mlx_clip reads 'clip' (a CLIPModel), "
            "'siglip' (a SiglipModel) and 'siglip2' (a Siglip2Model, at its grid's resolution)"
        )
    kinds = ("clip_text_model", "clip_vision_model")
    text, vision = _towers(config, (_TEXT_DEFAULTS, _VISION_DEFAULTS), kinds, where)
    sizes = _hf_sizes(config, text, vision, where)
    shared = _shared_settings(text, vision, where)
    # Pooling: eos_token_id 2 is HF's legacy argmax (ours); otherwise HF pools at the first
    # eos_token_id, which is the argmax only when EOT is the largest id.
    eos = text["eos_token_id"]
    if eos not in (2, text["vocab_size"] - 1):
        raise ConfigError(
            f"{where}: text_config.eos_token_id={eos}: mlx_clip pools text at argmax(token id), which "
            f"equals HF's pooling only for eos_token_id 2 (legacy argmax) or {text['vocab_size'] - 1} "
            "(EOT = largest id)"
        )
    cfg = ModelConfig(**sizes, **_mlp_fields(text, vision, shared_ratio=True), **shared)
    cfg.validate(f"{where}: model")  # what needs the whole architecture: divisibility, the parameter count
    return cfg


# mlx_clip's activation -> its name in transformers' ACT2FN (config.json's hidden_act)
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def _tower_json(cfg: ModelConfig, tower: str) -> dict:
    """The config.json keys that CLIP's and SigLIP's `tower` ("text" or "vision") configs share."""
    common = dict(
        hidden_size=getattr(cfg, f"{tower}_width"),
        intermediate_size=cfg.mlp_hidden(tower),
        num_hidden_layers=getattr(cfg, f"{tower}_layers"),
        num_attention_heads=getattr(cfg, f"{tower}_heads"),
        hidden_act=HF_ACTIVATIONS[cfg.tower_activation(tower)],
        layer_norm_eps=cfg.layer_norm_eps,
    )
    if tower == "text":
        return dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context_length, **common)
    return dict(num_channels=3, image_size=cfg.image_size, patch_size=cfg.patch_size, **common)


def hf_config_kwargs(cfg: ModelConfig) -> dict[str, dict]:
    """Keyword arguments for transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig."""
    # eos_token_id=2 selects HF's legacy argmax pooling, which is CLIP's.
    ids = dict(bos_token_id=cfg.vocab_size - 2, eos_token_id=2, pad_token_id=1)
    text = dict(_tower_json(cfg, "text"), projection_dim=cfg.embed_dim, **ids)
    vision = dict(_tower_json(cfg, "vision"), projection_dim=cfg.embed_dim)
    return {"text_config": text, "vision_config": vision, "projection_dim": cfg.embed_dim}


def hf_config_json(cfg: ModelConfig) -> dict:
    """ModelConfig -> a config.json that transformers.CLIPModel.from_pretrained reads."""
    kw = hf_config_kwargs(cfg)
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": kw["projection_dim"],
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "dtype": "float32",
        "text_config": {"model_type": "clip_text_model", **kw["text_config"]},
        "vision_config": {"model_type": "clip_vision_model", **kw["vision_config"]},
    }


# The ModelConfig options each transformers class builds (its towers' fixed shape).
CLIP_SHAPE = dict(
    vision_pool="cls",
    patch_bias=False,
    vision_pre_norm=True,
    vision_proj=True,
    vision_proj_bias=False,
    text_causal=True,
    text_pool="argmax",
    text_proj="proj",
)
SIGLIP_SHAPE = dict(
    vision_pool="map",
    patch_bias=True,
    vision_pre_norm=False,
    vision_proj=False,
    vision_proj_bias=False,
    text_causal=False,
    text_pool="last",
    text_proj="head",
)
# SigLIP's initial temperature and bias (the paper's log 10 and -10); the weights carry the trained values.
SIGLIP_INIT = dict(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)


NAFLEX_NOTE = (
    "siglip2 (NaFlex): imported for the fixed resolution of its position grid, {size} x {size} px; "
    "transformers resizes the grid to each image's aspect ratio, mlx_clip resizes images to this square"
)


def _naflex_grid(vision: dict, where: str) -> int:
    """Siglip2's (NaFlex) vision config has num_patches, a square position grid, and no image_size:
    mlx_clip uses it at that grid's resolution (grid * patch_size px, square)."""
    if "image_size" in vision:
        raise ConfigError(f"{where}: vision_config.image_size: a siglip2 (NaFlex) config has num_patches")
    n = _size(vision["num_patches"], "vision_config.num_patches", 4096**2, where)
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ConfigError(
            f"{where}: vision_config.num_patches={n} is not a square grid: mlx_clip's ViT keeps one "
            "square position grid"
        )
    return grid


def _siglip_model_config(config: dict, where: str) -> ModelConfig:
    """A transformers SiglipModel (or Siglip2Model, NaFlex) config.json -> ModelConfig; what our
    model cannot express is an error that names the field."""
    naflex = config.get("model_type") == "siglip2"
    kinds = tuple(k.replace("siglip", "siglip2") for k in _KINDS) if naflex else _KINDS
    vision_defaults = _SIGLIP_VISION_DEFAULTS
    if naflex:  # Siglip2VisionConfig: num_patches instead of image_size
        vision_defaults = {k: v for k, v in _SIGLIP_VISION_DEFAULTS.items() if k != "image_size"}
        vision_defaults["num_patches"] = 256
    text, vision = _towers(config, (_SIGLIP_TEXT_DEFAULTS, vision_defaults), kinds, where)
    if naflex:
        vision["image_size"] = _naflex_grid(vision, where) * _size(
            vision["patch_size"], "vision_config.patch_size", SIZE_LIMITS["patch_size"], where
        )
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
        **SIGLIP_PREPROCESSING,  # a preprocessor_config.json beside config.json replaces it (hf.py)
    )
    cfg.validate(f"{where}: model")
    return cfg


def siglip_config_json(cfg: ModelConfig) -> dict:
    """A SigLIP-shaped ModelConfig -> a config.json that transformers.SiglipModel.from_pretrained reads."""
    text = dict(
        model_type=_KINDS[0],
        **_tower_json(cfg, "text"),
        projection_size=cfg.embed_dim,
        # the model reads no token id (it pools the last position): the tokenizer files hold them
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    vision = dict(model_type=_KINDS[1], **_tower_json(cfg, "vision"), vision_use_head=True)
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
