"""open_clip checkpoints <-> mlx_clip checkpoints.

Import (`python -m mlx_clip.convert --from open_clip SRC --out OUT [--arch NAME]`), SRC being:

* a directory with open_clip_config.json (its `model_cfg`) and open_clip_model.safetensors
  (or open_clip_pytorch_model.bin, read with `torch.load(weights_only=True)`), as open_clip's
  `local-dir:` / `hf-hub:` models are laid out;
* a plain state dict (.safetensors, .bin, .pt, .pth; open_clip training checkpoints with a
  "state_dict" entry too) plus `--arch NAME`: an open_clip model name (ViT-B-32,
  ViT-B-32-quickgelu, ...: its JSON is read from the installed open_clip package without
  importing torch), a path to such a JSON, or an mlx_clip architecture name (vit_b32, ...).

Two kinds of open_clip model map onto mlx_clip: open_clip's own ViT + text-transformer CLIP with
argmax text pooling (the OpenAI layout, here), and a timm ViT image tower with open_clip's text
tower (the SigLIP configs, MobileCLIP2-L/14: open_clip_timm.py and layouts_timm.py; reading a timm
definition imports timm and torch). Any other variant (other pooling, layer scale, attentional
pooler, conv / EVA / hybrid timm towers, HF text towers, CoCa, ...) is refused with an error that
names the config field. The tokenizer is the OpenAI one when vocab_size is 49408, else the
directory's Hugging Face tokenizer files for an `hf_tokenizer_name` config.

Export writes the OpenAI layout when open_clip's own CLIP can express the model, else a
CustomTextCLIP whose timm_model_name is the registered timm ViT that equals the image tower
(refused, naming the closest one's difference, when there is none).

A model trained with a sigmoid (SigLIP) loss has a learnable `logit_bias` beside `logit_scale`:
open_clip's `init_logit_bias` / `init_logit_scale` map to ModelConfig's fields of the same names
both ways, and the tensor travels as "logit_bias" (a scalar; shape (1,) under open_clip's
`nonscalar_logit_scale`, read as a scalar). A state dict that has a logit_bias while its config
sets no init_logit_bias (open_clip_train --siglip passes both as arguments, not in the config) is
read with open_clip_train's SigLIP init, log 10 and -10.

Export (`python -m mlx_clip.export --to open_clip --out OUT`) writes open_clip_config.json and
open_clip_model.safetensors. Load recipe (open_clip >= 2.23, checked with 3.3.0, offline):

    import open_clip
    model = open_clip.create_model("local-dir:OUT")         # builds model_cfg, strict load_state_dict
    tokenizer = open_clip.get_tokenizer("local-dir:OUT")
    # or: model = open_clip.model.CLIP(**json.load(open("OUT/open_clip_config.json"))["model_cfg"])
    #     model.load_state_dict(safetensors.torch.load_file("OUT/open_clip_model.safetensors"))

With the OpenAI vocab open_clip's own tokenizer gives our ids exactly. A trained vocab is written as
Hugging Face tokenizer files and named in `text_cfg.hf_tokenizer_name`, so `get_tokenizer` above
loads it (it pads with EOT instead of 0, which leaves the features unchanged).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..config import SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT
from ..models.config import ModelConfig, available_models, model_config
from ..schema import ConfigError
from ..text.tokenizer import OPENAI_VOCAB_SIZE
from ..text.vocab import openai_tokenizer
from .files import contiguous, read_checkpoint, read_state_dict, staged_output, write_checkpoint
from .hf import read_hf_tokenizer, write_hf_tokenizer
from .layouts import BIAS_KEY, WeightError, canonical_to_open_clip, open_clip_to_canonical
from .layouts_timm import canonical_to_open_clip_timm, is_timm_layout, open_clip_timm_to_canonical
from .open_clip_timm import (
    field_problems,
    is_timm_config,
    layer_norm_eps,
    needs_timm,
    open_clip_timm_cfg,
    optional_float,
    timm_model_config,
)
from .preprocess import describe, open_clip_preprocess_cfg, open_clip_preprocess_fields

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
TRAINED_TOKENIZER_NAME = "mlx_clip-bpe"  # open_clip's local-dir: loads the files next to the config
OPEN_CLIP_CLEANS = ("canonicalize", "whitespace", "lower")  # open_clip's HFTokenizer `clean` values

# open_clip's CLIPVisionCfg / CLIPTextCfg defaults for the fields that set shapes.
_VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16, image_size=224)
_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0)
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
# Fields that must keep the value (or one of the values) of the plain CLIP that mlx_clip implements.
_VISION_FIXED = {
    "ls_init_value": (None,),
    "attentional_pool": (False,),
    "no_ln_pre": (False,),
    "pos_embed_type": ("learnable",),
    "final_ln_after_pool": (False,),
    "pool_type": ("tok",),
    "act_kwargs": (None, {}),
    "block_type": (None, "default"),
    "timm_model_name": (None,),
    **{k: (False,) for k in _CUSTOM_BLOCK},
}
_TEXT_FIXED = {
    "ls_init_value": (None,),
    "embed_cls": (False,),
    "no_causal_mask": (False,),
    "final_ln_after_pool": (False,),
    "pool_type": ("argmax",),
    "proj_bias": (False,),
    "proj_type": ("linear",),
    "act_kwargs": (None, {}),
    "block_type": (None, "default"),
    "hf_model_name": (None,),
    **{k: (False,) for k in _CUSTOM_BLOCK},
}
# Fields with no effect on the weights or on inference features (training-time or unused here).
_VISION_INERT = {
    "patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained",
    "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
}  # fmt: skip
_TEXT_INERT = {
    "pad_id", "eos_id", "output_tokens", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type",
    "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs",
}  # fmt: skip
_TOP_FIXED = {"custom_text": (False, True)}
# Shape fields, and the logit scale / bias inits (ModelConfig's; the checkpoint holds the trained values).
_TOP_KNOWN = {
    "embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
    "nonscalar_logit_scale",
}  # fmt: skip


# ---------------------------------------------------------------------------
# model_cfg <-> ModelConfig


def _check_fields(section: dict, fixed: dict, known: set, where: str) -> None:
    problems = field_problems(section, fixed, known, where)
    if problems:
        raise ConfigError(problems[0])


def open_clip_model_config(model_cfg: dict, where: str = "model_cfg") -> ModelConfig:
    """An open_clip model_cfg (a model_configs/*.json) -> ModelConfig; errors name the field."""
    if is_timm_config(model_cfg):  # SigLIP, MobileCLIP2-L/14: open_clip_timm.py
        return timm_model_config(model_cfg, where)
    if "multimodal_cfg" in model_cfg:
        raise ConfigError(f"{where}.multimodal_cfg: CoCa models are not supported")
    _check_fields(model_cfg, _TOP_FIXED, _TOP_KNOWN, where)
    vw, tw = f"{where}.vision_cfg", f"{where}.text_cfg"
    vraw, traw = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    _check_fields(vraw, _VISION_FIXED, _VISION_INERT | set(_VISION_DEFAULTS) | {"norm_kwargs"}, vw)
    _check_fields(traw, _TEXT_FIXED, _TEXT_INERT | set(_TEXT_DEFAULTS) | {"norm_kwargs"}, tw)
    vision, text = {**_VISION_DEFAULTS, **vraw}, {**_TEXT_DEFAULTS, **traw}
    if not isinstance(vision["layers"], int):
        raise ConfigError(f"{vw}.layers={vision['layers']}: a ResNet image tower is not supported")
    for key in ("width", "head_width"):  # divided below; every other size is checked by ModelConfig
        if isinstance(vision[key], bool) or not isinstance(vision[key], int) or vision[key] < 1:
            raise ConfigError(f"{vw}.{key} must be a positive integer, got {vision[key]!r}")
    if vision["width"] % vision["head_width"]:
        raise ConfigError(
            f"{vw}.width={vision['width']} is not a multiple of head_width {vision['head_width']}"
        )
    if vision["mlp_ratio"] != text["mlp_ratio"]:
        raise ConfigError(
            f"{vw}.mlp_ratio={vision['mlp_ratio']} differs from text_cfg.mlp_ratio={text['mlp_ratio']}; "
            "mlx_clip uses one mlp_ratio"
        )
    eps = layer_norm_eps(vision, vw)
    if layer_norm_eps(text, tw) != eps:
        raise ConfigError(f"{vw}.norm_kwargs.eps differs from text_cfg.norm_kwargs.eps; mlx_clip uses one")
    image, patch = vision["image_size"], vision["patch_size"]
    for name, value in (("image_size", image), ("patch_size", patch)):
        if isinstance(value, (list, tuple)) and (len(value) != 2 or value[0] != value[1]):
            raise ConfigError(f"{vw}.{name}={value}: only square images and patches are supported")
    cfg = ModelConfig(
        embed_dim=model_cfg["embed_dim"],
        image_size=int(image[0] if isinstance(image, (list, tuple)) else image),
        patch_size=int(patch[0] if isinstance(patch, (list, tuple)) else patch),
        vision_width=vision["width"],
        vision_layers=vision["layers"],
        vision_heads=vision["width"] // vision["head_width"],
        context_length=text["context_length"],
        vocab_size=text["vocab_size"],
        text_width=text["width"],
        text_layers=text["layers"],
        text_heads=text["heads"],
        mlp_ratio=float(text["mlp_ratio"]),
        activation="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        layer_norm_eps=eps,
        init_logit_scale=optional_float(model_cfg, "init_logit_scale", where),
        init_logit_bias=optional_float(model_cfg, "init_logit_bias", where),
    )
    cfg.validate(where)
    return cfg


def open_clip_cfg(cfg: ModelConfig) -> dict:
    """ModelConfig -> an open_clip model_cfg (the content of a model_configs/*.json)."""
    norm = {"norm_kwargs": {"eps": cfg.layer_norm_eps}} if cfg.layer_norm_eps != 1e-5 else {}
    # Unset inits stay out: open_clip's defaults are ours (log(1/0.07), no bias).
    inits = {k: v for k in ("init_logit_scale", "init_logit_bias") if (v := getattr(cfg, k)) is not None}
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": cfg.activation == "quick_gelu",
        **inits,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "patch_size": cfg.patch_size,
            "layers": cfg.vision_layers,
            "width": cfg.vision_width,
            "head_width": cfg.vision_width // cfg.vision_heads,
            "mlp_ratio": cfg.mlp_ratio,
            **norm,
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": cfg.vocab_size,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
            "mlp_ratio": cfg.mlp_ratio,
            **norm,
        },
    }


def arch_config(name: str) -> ModelConfig:
    """--arch: an mlx_clip architecture, a model_cfg JSON file, or an open_clip model name."""
    if name in available_models():
        return model_config(name)
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        return open_clip_model_config(data.get("model_cfg", data), f"{path}: model_cfg")
    try:  # find_spec locates the package without importing it (open_clip imports torch)
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    for location in (spec and spec.submodule_search_locations) or []:
        candidate = Path(location) / "model_configs" / f"{name}.json"
        if candidate.is_file():
            return open_clip_model_config(json.loads(candidate.read_text()), f"{name}: model_cfg")
    where = "the installed open_clip" if spec else "open_clip (not installed)"
    raise ConfigError(
        f"--arch {name!r}: not an mlx_clip architecture ({', '.join(available_models())}), "
        f"a model_cfg .json file, or a model name in {where}"
    )


# ---------------------------------------------------------------------------
# Import / export


def _source(src: Path, arch: str | None) -> tuple[ModelConfig, dict, Path, dict]:
    """-> (ModelConfig, raw model_cfg or {}, weights path, state dict)."""
    raw: dict = {}
    if src.is_dir():
        weights = next((src / n for n in WEIGHT_FILES if (src / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{src}: no open_clip weights ({', '.join(WEIGHT_FILES)})")
        if arch is None:
            if not (src / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"{src}: no {CONFIG_FILE}; pass --arch NAME")
            data = json.loads((src / CONFIG_FILE).read_text())
            if "model_cfg" not in data:
                raise ConfigError(f"{src / CONFIG_FILE}: no 'model_cfg' entry")
            raw = data["model_cfg"]
            cfg = open_clip_model_config(raw, f"{src / CONFIG_FILE}: model_cfg")
            where = f"{src / CONFIG_FILE}: preprocess_cfg"
            pp = open_clip_preprocess_fields(data.get("preprocess_cfg", {}), cfg.image_size, where)
            cfg = dataclasses.replace(cfg, **pp)
            cfg.validate(where)
    elif src.is_file():
        if arch is None:
            raise ConfigError(f"{src}: a plain state dict needs --arch NAME (e.g. ViT-B-32-quickgelu)")
        weights = src
    else:
        raise FileNotFoundError(f"{src} does not exist")
    if arch is not None:
        cfg = arch_config(arch)
    return cfg, raw, weights, read_state_dict(weights)


def import_open_clip(
    src: str | Path, out: str | Path, arch: str | None = None, force: bool = False
) -> list[str]:
    """An open_clip checkpoint -> an mlx_clip checkpoint directory. Returns notes to print."""
    cfg, raw, weights, oc_state = _source(Path(src), arch)
    notes = [f"read {weights}", f"preprocessing: {describe(cfg)}"]
    if BIAS_KEY in oc_state and cfg.init_logit_bias is None:
        scale = SIGLIP_LOGIT_SCALE_INIT if cfg.init_logit_scale is None else cfg.init_logit_scale
        cfg = dataclasses.replace(cfg, init_logit_scale=scale, init_logit_bias=SIGLIP_LOGIT_BIAS_INIT)
        notes.append(
            f"the weights have a logit_bias and the config sets no init_logit_bias: a SigLIP model, "
            f"recorded with open_clip_train --siglip's init (init_logit_scale {scale:.6g}, "
            f"init_logit_bias {SIGLIP_LOGIT_BIAS_INIT:g})"
        )
    try:
        if is_timm_layout(oc_state):  # a timm image tower under visual.trunk
            state = open_clip_timm_to_canonical(oc_state, cfg, np.concatenate)
        else:
            state = open_clip_to_canonical(oc_state, cfg)
    except WeightError as e:
        raise WeightError(f"{weights}: {e}") from None
    tok = None
    hf_name = raw.get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_name:
        # open_clip's local-dir: loads a Hugging Face tokenizer from the model directory itself.
        # Its text cleaning is open_clip's HFTokenizer's: tokenizer_kwargs' "clean", else "whitespace".
        clean = raw["text_cfg"].get("tokenizer_kwargs", {}).get("clean", "whitespace")
        tok = read_hf_tokenizer(Path(src), cfg, clean=clean) if Path(src).is_dir() else None
        notes.append(
            f"tokenizer: {tok!r}"
            if tok
            else f"tokenizer: none written: the config names the Hugging Face tokenizer {hf_name!r}, "
            f"which is not downloaded; put its files (tokenizer.json and tokenizer_config.json, or "
            f"a SentencePiece .model) in {src} and convert again"
        )
    elif cfg.vocab_size == OPENAI_VOCAB_SIZE:
        tok = openai_tokenizer()
        tok.context_length = cfg.context_length
        notes.append("tokenizer: OpenAI CLIP vocabulary")
    else:
        notes.append(f"tokenizer: none written (vocab_size {cfg.vocab_size} is not the OpenAI vocab)")
    write_checkpoint(out, cfg, state, tok, str(weights), force)
    return notes


def export_open_clip(
    checkpoint: str | Path, out: str | Path, force: bool = False, ema: bool = False
) -> list[str]:
    """An mlx_clip checkpoint (`ema`: its EMA weights) -> open_clip_config.json +
    open_clip_model.safetensors (+ tokenizer)."""
    ckpt, cfg, state, tok = read_checkpoint(checkpoint, ema)
    notes = [f"from {ckpt}"]
    if needs_timm(cfg):  # SigLIP-style towers: a timm image tower in a CustomTextCLIP
        model_cfg, head = open_clip_timm_cfg(cfg)
        oc_state = contiguous(canonical_to_open_clip_timm(state, cfg, head))
        notes.append(f"image tower: timm {model_cfg['vision_cfg']['timm_model_name']}")
    else:
        oc_state = contiguous(canonical_to_open_clip(state, cfg))
        model_cfg = open_clip_cfg(cfg)
    if cfg.init_logit_bias is not None:
        notes.append(f"logit_bias: {float(state[BIAS_KEY]):g} (SigLIP; model_cfg.init_logit_bias is set)")
    with staged_output(out, force) as tmp:
        if tok is not None and tok.kind != "openai":
            # open_clip's default tokenizer is OpenAI's: point it at HF files of ours instead.
            model_cfg["text_cfg"]["hf_tokenizer_name"] = TRAINED_TOKENIZER_NAME
            write_hf_tokenizer(tok, tmp, cfg.context_length)
            notes.append(f"tokenizer: {tok.kind} ({tok.vocab_size} tokens) as Hugging Face files")
            if getattr(tok, "clean", None) in OPEN_CLIP_CLEANS:  # a checkpoint's own tokenizer
                model_cfg["text_cfg"]["tokenizer_kwargs"] = {"clean": tok.clean}
            elif getattr(tok, "clean", None) not in (None, "none"):
                notes.append(f"tokenizer: open_clip has no {tok.clean!r} text cleaning; it will use its own")
        elif tok is None and cfg.vocab_size != OPENAI_VOCAB_SIZE:
            notes.append("tokenizer: none in the checkpoint; open_clip's default (OpenAI) will not fit")
        save_file(oc_state, str(tmp / "open_clip_model.safetensors"), metadata={"format": "pt"})
        config = {"model_cfg": model_cfg, "preprocess_cfg": open_clip_preprocess_cfg(cfg)}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return notes
