"""A checkpoint's image preprocessing <-> Hugging Face preprocessor_config.json and open_clip's
preprocess_cfg.

ModelConfig holds it (image_mean, image_std, resize_mode, interpolation; data/transforms.py
ImagePreprocess applies it). Import reads it from the source and refuses what mlx_clip cannot
reproduce, naming the key; export writes the checkpoint's own values back, so that

    transformers.AutoImageProcessor.from_pretrained(OUT, backend="pil")    # transformers 5
    open_clip.image_transform(**preprocess_cfg, is_train=False)             # with PIL images

give our pixels (within 3e-7, the normalisation's float rounding). transformers 5's default
backend is torchvision, whose filters differ from PIL's by up to a few 8-bit levels. Two known
differences of HF's CLIPImageProcessor itself: it centre-crops at floor((size - crop) / 2) where
CLIP, open_clip and mlx_clip round (one pixel apart for some non-square images).

- resize_mode "shortest": size {"shortest_edge": S} + a centre crop of S x S (CLIP's processor);
  open_clip's resize_mode "shortest".
- resize_mode "squash": size {"height": S, "width": S} and no crop (SigLIP's processor); open_clip's
  resize_mode "squash". SigLIP 2's NaFlex processor (max_num_patches of patch_size px, no size) reads
  as a squash to its square grid, the resolution a siglip2 model is imported at. open_clip's
  "longest" (resize the longer side, pad) is refused.
- interpolation: PIL's filter numbers 0 (nearest), 2 (bilinear), 3 (bicubic) in "resample";
  open_clip's names (open_clip has no "nearest").
- do_normalize false is mean 0, std 1; do_rescale false (pixels already in [0, 1]) is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from ..models.config import OPENAI_MEAN, OPENAI_STD, ModelConfig
from ..schema import ConfigError

HF_FILE = "preprocessor_config.json"
HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's filter numbers
_PIL_FILTERS = {1: "lanczos", 4: "box", 5: "hamming"}  # the ones we refuse, for messages
# The defaults of transformers' processors, for keys a preprocessor_config.json leaves out.
_HF_DEFAULTS = {
    "CLIPImageProcessor": dict(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
        resample=3, image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD),
    ),
    "SiglipImageProcessor": dict(
        size={"height": 224, "width": 224}, do_center_crop=False, resample=3,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ),
    # NaFlex: no size; an image is resized to fit max_num_patches patches of patch_size px
    "Siglip2ImageProcessor": dict(
        patch_size=16, max_num_patches=256, do_center_crop=False, resample=2,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    ),
}  # fmt: skip


# SigLIP's preprocessing (SiglipImageProcessor's defaults, configs/models/siglip_*.yaml) as
# ModelConfig fields: what a SigLIP import without a preprocessor_config.json gets.
SIGLIP_PREPROCESSING = dict(
    image_mean=[0.5] * 3, image_std=[0.5] * 3, resize_mode="squash", interpolation="bicubic"
)


def _three(value, key: str, where: str) -> list[float]:
    """A mean or std: one number or three (R, G, B)."""
    values = value if isinstance(value, (list, tuple)) else [value] * 3
    ok = len(values) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
    if not ok:
        raise ConfigError(f"{where}: {key} must be a number or 3 numbers, got {value!r}")
    return [float(v) for v in values]


def _side(value, key: str, where: str) -> int:
    """A square size: an int, or {"height": S, "width": S} / [S, S] with equal sides."""
    if isinstance(value, dict) and set(value) == {"height", "width"}:
        value = [value["height"], value["width"]]
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: {key}={value!r}: expected one square size (mlx_clip's input is S x S)")
    return value


def _naflex_size(pp: dict, where: str) -> dict:
    """Siglip2ImageProcessor (NaFlex) resizes a square image to the largest square grid of at most
    max_num_patches patches: mlx_clip's squash to that size (a siglip2 model is imported at its
    grid's fixed resolution; hf_config.NAFLEX_NOTE)."""
    n, patch = pp["max_num_patches"], pp["patch_size"]
    for key, value in (("max_num_patches", n), ("patch_size", patch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    side = math.isqrt(n) * patch
    return {"height": side, "width": side}


def _check_size(size: int, image_size: int, key: str, where: str) -> None:
    if size != image_size:
        raise ConfigError(
            f"{where}: {key} is {size} but the model's image_size is {image_size}; mlx_clip resizes "
            "straight to the model's input size (a resize then a smaller crop is not supported)"
        )


# ---------------------------------------------------------------------------
# Hugging Face preprocessor_config.json


def _hf_resize_mode(pp: dict, image_size: int, where: str) -> str:
    size, crop = pp["size"], pp.get("do_center_crop")
    if isinstance(size, int) or (isinstance(size, dict) and set(size) == {"shortest_edge"}):
        side = size if isinstance(size, int) else size["shortest_edge"]  # an int is shortest_edge in HF
        _check_size(_side(side, "size.shortest_edge", where), image_size, "size.shortest_edge", where)
        if not crop:
            raise ConfigError(
                f"{where}: size.shortest_edge without do_center_crop gives non-square images; "
                "mlx_clip's 'shortest' resize mode crops the centre"
            )
        _check_size(_side(pp.get("crop_size"), "crop_size", where), image_size, "crop_size", where)
        return "shortest"
    _check_size(_side(size, "size", where), image_size, "size", where)
    if crop:
        _check_size(_side(pp.get("crop_size"), "crop_size", where), image_size, "crop_size", where)
    return "squash"


def hf_preprocess_fields(pp: dict, image_size: int, where: str = HF_FILE) -> dict:
    """A preprocessor_config.json (a CLIP or SigLIP image processor) -> ModelConfig's image_mean,
    image_std, resize_mode and interpolation; what mlx_clip cannot reproduce is an error naming
    the key."""
    if not isinstance(pp, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(pp).__name__}")
    legacy = str(pp.get("feature_extractor_type", "CLIPFeatureExtractor"))  # older files name only this
    kind = str(pp.get("image_processor_type", legacy.replace("FeatureExtractor", "ImageProcessor")))
    base = next((k for k in _HF_DEFAULTS if kind in (k, k + "Fast", k + "Pil")), None)
    if base is None:
        raise ConfigError(
            f"{where}: image_processor_type={kind!r}; mlx_clip reads {' and '.join(_HF_DEFAULTS)}"
        )
    pp = {**_HF_DEFAULTS[base], **pp}
    if base == "Siglip2ImageProcessor":
        pp["size"] = _naflex_size(pp, where)
    if pp.get("do_resize", True) is not True:
        raise ConfigError(f"{where}: do_resize={pp['do_resize']!r}: mlx_clip always resizes to image_size")
    if pp.get("do_rescale", True) is not True:
        raise ConfigError(
            f"{where}: do_rescale={pp['do_rescale']!r} expects pixels already in [0, 1]; mlx_clip reads "
            "8-bit images and scales them by 1/255"
        )
    factor = pp.get("rescale_factor", 1 / 255)
    if not isinstance(factor, (int, float)) or not math.isclose(factor, 1 / 255, rel_tol=1e-6):
        raise ConfigError(f"{where}: rescale_factor={factor!r}; mlx_clip scales 8-bit pixels by 1/255")
    resample = pp["resample"]
    if isinstance(resample, bool) or not isinstance(resample, int) or resample not in HF_RESAMPLE:
        name = (
            f" ({_PIL_FILTERS[resample]})" if isinstance(resample, int) and resample in _PIL_FILTERS else ""
        )
        allowed = ", ".join(f"{k} ({v})" for k, v in HF_RESAMPLE.items())
        raise ConfigError(f"{where}: resample={resample!r}{name}; mlx_clip supports {allowed}")
    normalize = pp.get("do_normalize", True)
    mean = _three(pp["image_mean"], "image_mean", where) if normalize else [0.0] * 3
    std = _three(pp["image_std"], "image_std", where) if normalize else [1.0] * 3
    return dict(
        image_mean=mean,
        image_std=std,
        resize_mode=_hf_resize_mode(pp, image_size, where),
        interpolation=HF_RESAMPLE[resample],
    )


def hf_preprocessor_config(
    cfg: ModelConfig, image_processor: str = "CLIPImageProcessor", processor: str = "CLIPProcessor"
) -> dict:
    """The preprocessor_config.json of `cfg`'s preprocessing, for transformers' `image_processor`
    (CLIPImageProcessor or SiglipImageProcessor: both read these keys alike)."""
    S, squash = cfg.image_size, cfg.resize_mode == "squash"
    return {
        "image_processor_type": image_processor,
        "processor_class": processor,
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": S, "width": S} if squash else {"shortest_edge": S},
        "resample": next(k for k, v in HF_RESAMPLE.items() if v == cfg.interpolation),
        "do_center_crop": not squash,
        "crop_size": {"height": S, "width": S},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
    }


def with_hf_preprocessing(
    cfg: ModelConfig, directory: Path, default: str = "CLIP's"
) -> tuple[ModelConfig, str]:
    """(cfg with the preprocessing of directory/preprocessor_config.json, a note saying what was
    read); without that file, cfg is unchanged (its preprocessing is `default`'s, named in the note)."""
    path = directory / HF_FILE
    if not path.is_file():
        return cfg, f"preprocessing: no {HF_FILE}, {default} kept ({describe(cfg)})"
    try:
        pp = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from None
    cfg = dataclasses.replace(cfg, **hf_preprocess_fields(pp, cfg.image_size, str(path)))
    cfg.validate(f"{path}: model")
    return cfg, f"preprocessing: {describe(cfg)} (from {HF_FILE})"


# ---------------------------------------------------------------------------
# open_clip preprocess_cfg

OPEN_CLIP_INTERPOLATIONS = ("bicubic", "bilinear")


def open_clip_preprocess_fields(pp: dict, image_size: int, where: str = "preprocess_cfg") -> dict:
    """open_clip's preprocess_cfg (open_clip_config.json) -> ModelConfig's preprocessing fields.
    Keys it leaves out keep open_clip's defaults (CLIP's); fill_color only matters for "longest"."""
    if not isinstance(pp, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(pp).__name__}")
    if "size" in pp:
        _check_size(_side(pp["size"], "size", where), image_size, "size", where)
    if pp.get("mode", "RGB") != "RGB":
        raise ConfigError(f"{where}.mode={pp['mode']!r}: only 'RGB' is supported")
    mode = pp.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ConfigError(
            f"{where}.resize_mode={mode!r}: mlx_clip supports 'shortest' (centre crop) and 'squash'; "
            "'longest' (resize the longer side, pad with fill_color) is not supported"
        )
    interpolation = pp.get("interpolation", "bicubic")
    if interpolation == "random":  # open_clip's eval transform uses bicubic for it
        interpolation = "bicubic"
    if interpolation not in OPEN_CLIP_INTERPOLATIONS:
        raise ConfigError(f"{where}.interpolation={interpolation!r}: expected 'bicubic' or 'bilinear'")
    return dict(
        image_mean=_three(pp.get("mean", OPENAI_MEAN), "mean", where),
        image_std=_three(pp.get("std", OPENAI_STD), "std", where),
        resize_mode=mode,
        interpolation=interpolation,
    )


def open_clip_preprocess_cfg(cfg: ModelConfig) -> dict:
    """`cfg`'s preprocessing as open_clip's preprocess_cfg."""
    if cfg.interpolation not in OPEN_CLIP_INTERPOLATIONS:
        raise ConfigError(
            f"interpolation={cfg.interpolation!r}: open_clip's transforms have only "
            f"{' and '.join(OPEN_CLIP_INTERPOLATIONS)}; export this checkpoint to HF instead"
        )
    return {
        "size": cfg.image_size,
        "mode": "RGB",
        "mean": list(cfg.image_mean),
        "std": list(cfg.image_std),
        "interpolation": cfg.interpolation,
        "resize_mode": cfg.resize_mode,
    }


def describe(cfg: ModelConfig) -> str:
    """One line for convert's notes: resize mode, filter, mean/std."""
    mean, std = (", ".join(f"{v:.4g}" for v in x) for x in (cfg.image_mean, cfg.image_std))
    return f"{cfg.resize_mode} {cfg.interpolation}, mean ({mean}), std ({std})"


__all__ = [
    "hf_preprocess_fields",
    "hf_preprocessor_config",
    "open_clip_preprocess_cfg",
    "open_clip_preprocess_fields",
    "with_hf_preprocessing",
]
