"""Image preprocessing: mode conversion, resize / crop, augmentation, normalisation.

Framework-free (numpy + PIL) so the MLX loader, torch_ref and the CLIs share one
implementation. Every transform returns float32 (S, S, 3) HWC, normalised with the
model's mean/std.

A model's preprocessing is part of its ModelConfig (image_mean, image_std, resize_mode,
interpolation); `ImagePreprocess.of(model_config)` is the one place that turns those into
transforms, and its defaults are CLIP's (OpenAI mean/std, shortest side, bicubic).

- `eval_transform(S)` reproduces CLIP's preprocessing: bicubic resize of the shorter
  side to S (PIL, torchvision's size rounding), centre crop (torchvision's offset
  rounding), [0, 1] scaling, normalisation. An image whose resized form would hold more
  than EXACT_RESIZE_LIMIT output images (aspect ratio over 16) has its crop's source
  region resampled straight to S x S instead (`resample_box`): a 1 x 200,000 image would
  otherwise resize to 224 x 44.8M pixels. Those pixels differ slightly from CLIP's: PIL
  takes the box in float32 and may run its two passes in the other order.
  resize_mode "squash" (SigLIP's) resizes the whole image to S x S instead, as HF's
  SiglipImageProcessor and open_clip's squash transform do (PIL, the model's filter); a
  source taller than EXACT_RESIZE_LIMIT * S rows is resized along its height first.
- `train_transform(S, ...)` is a random resized crop plus optional colour jitter and
  flip, with all randomness drawn from an explicit `np.random.Generator`, so the
  loader can make each sample's augmentation a pure function of (seed, epoch, index).

Deliberate differences from `PIL.Image.convert("RGB")`, which CLIP uses: transparent
images are composited over white (converting drops alpha and exposes whatever colour
the invisible pixels hold), 16-bit images keep their high byte (PIL clips them,
turning most 16-bit photos white), and every image is converted *before* resizing
(CLIP converts after, so palette images get PIL's nearest-neighbour resize). RGB and L
images give exactly CLIP's pixels; CMYK ones agree within one 8-bit level.

Bounded work: both transforms accept a lazy PIL image (opened, not yet decoded). A JPEG
whose crop has at least 2 * DRAFT_OVERSAMPLE source pixels per output pixel is decoded at
1/2, 1/4 or 1/8 scale, keeping >= DRAFT_OVERSAMPLE (so CLIP's pixels are exact below that,
near-exact above); other formats decode in full, within data.max_image_pixels
(data/decode.py). After decoding, no buffer is larger than the source or
EXACT_RESIZE_LIMIT output images.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..models.config import OPENAI_MEAN, OPENAI_STD, Interpolation, ResizeMode

RESAMPLE = {  # ModelConfig.interpolation -> PIL's filter
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
# ITU-R 601 luma, as torchvision's rgb_to_grayscale (used by contrast / saturation jitter).
_LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


# ---------------------------------------------------------------------------
# Mode conversion


def _composite_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend uint8 (H, W, 3) colours over a white background using uint8 (H, W) alpha."""
    a = alpha.astype(np.uint32)[..., None]
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255  # rounded integer blend
    return out.astype(np.uint8)


def _array_to_rgb(x: np.ndarray) -> np.ndarray:
    """uint8/uint16 (H, W), (H, W, 1|2|3|4) -> uint8 (H, W, 3)."""
    if x.dtype == np.uint16:
        x = (x >> 8).astype(np.uint8)  # keep the high byte: 16-bit -> 8-bit without clipping
    if x.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 or uint16, got {x.dtype}")
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4):
        raise ValueError(f"expected an (H, W[, 1|2|3|4]) image array, got shape {x.shape}")
    c = x.shape[-1]
    if c in (2, 4):  # gray+alpha / RGBA
        color = np.repeat(x[..., :1], 3, axis=-1) if c == 2 else x[..., :3]
        return _composite_white(color, x[..., -1])
    return np.repeat(x, 3, axis=-1) if c == 1 else x


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info


def to_rgb(img: Image.Image | np.ndarray) -> Image.Image:
    """Any PIL image or uint8/uint16 array -> an RGB PIL image (see module doc for the rules)."""
    if isinstance(img, np.ndarray):
        return Image.fromarray(_array_to_rgb(img))
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        # PIL's own conversion saturates at 255; take the high byte instead.
        return Image.fromarray(_array_to_rgb(np.asarray(img).astype(np.uint16)))
    if img.mode == "I":
        # 32-bit int, in practice a 16-bit PNG opened by an older Pillow.
        return Image.fromarray(_array_to_rgb(np.clip(np.asarray(img), 0, 65535).astype(np.uint16)))
    if img.mode == "F":
        return Image.fromarray(_array_to_rgb(np.clip(np.asarray(img), 0, 255).astype(np.uint8)))
    if img.mode == "La":
        img = img.convert("LA")  # PIL has no La -> RGBA conversion; un-premultiply first
    if _has_alpha(img):
        rgba = np.asarray(img.convert("RGBA"))
        return Image.fromarray(_composite_white(rgba[..., :3], rgba[..., 3]))
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


# ---------------------------------------------------------------------------
# Geometry


def _shorter_to(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side `size`, the longer one truncated like torchvision."""
    return (size, int(size * height / width)) if width <= height else (int(size * width / height), size)


def resize_shorter(im: Image.Image, size: int, interpolation: Interpolation = "bicubic") -> Image.Image:
    """Resize so the shorter side is `size` (unbounded for a thin image: the eval path uses
    center_crop_box instead)."""
    new = _shorter_to(*im.size, size)
    return im if new == im.size else im.resize(new, RESAMPLE[interpolation])


def _center_offsets(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of the central size x size square, rounded like torchvision's CenterCrop."""
    if width < size or height < size:
        raise ValueError(f"center crop: image {width}x{height} is smaller than {size}")
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def center_crop(im: Image.Image, size: int) -> Image.Image:
    left, top = _center_offsets(im.width, im.height, size)
    return im.crop((left, top, left + size, top + size))


def center_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source region that `resize_shorter` + `center_crop` keep, in source pixels.

    Resampling this box straight to size x size gives (nearly: see the module doc) CLIP's pixels
    without making the resized image, whose longer side is unbounded (1 x 200,000 -> 224 x 44.8M).
    """
    new_w, new_h = _shorter_to(width, height, size)
    left, top = _center_offsets(new_w, new_h, size)
    sx, sy = width / new_w, height / new_h  # source pixels per resized pixel, per axis
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Sample a crop box (left, top, right, bottom) with torchvision's RandomResizedCrop rules.

    Up to 10 tries of area fraction ~ U(scale) and log aspect ~ U(log ratio); if none fits,
    fall back to the largest central crop whose aspect ratio lies within `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


# ---------------------------------------------------------------------------
# Bounded resampling: decoding scaled to the crop, and no resized copy of the whole image

# A lazy JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT) only while its crop keeps
# at least this many source pixels per output pixel; smaller ones decode in full, exactly as CLIP.
DRAFT_OVERSAMPLE = 4
# Eval: resize the whole image (CLIP's exact pixels) while that holds at most this many outputs.
EXACT_RESIZE_LIMIT = 16


def image_size(img: Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height) of a PIL image (lazy or loaded) or an (H, W[, C]) array."""
    return (img.shape[1], img.shape[0]) if isinstance(img, np.ndarray) else img.size


def _draft(im: Image.Image, box: tuple, size: int) -> tuple:
    """Let a lazy JPEG decode at a reduced scale when `box` is large; `box` in the new pixels."""
    if not isinstance(im, Image.Image):
        return box
    reduce = min(box[2] - box[0], box[3] - box[1]) / (DRAFT_OVERSAMPLE * size)
    s = next((k for k in (8, 4, 2) if k <= reduce), 1)
    if s == 1:
        return box
    w, h = im.size
    drafted = im.draft(None, (w // s, h // s))  # None: not a JPEG, or already decoded
    if drafted is None:
        return box
    fx, fy = drafted[1][2] / w, drafted[1][3] / h  # new pixels per source pixel (1 / scale)
    return box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy


def resample_box(
    img: Image.Image | np.ndarray, box: tuple, size: int, interpolation: Interpolation = "bicubic"
) -> np.ndarray:
    """uint8 (size, size, 3): the source region `box` (left, top, right, bottom, in source pixels,
    fractions allowed) resampled to size x size with PIL's `interpolation` filter.

    The work after decoding is bounded by the output, not the image: PIL's resize(box=) resamples
    only the rows the box needs, into a size-wide buffer, and a lazy JPEG is decoded at a reduced
    scale when the box is large (DRAFT_OVERSAMPLE). (Cropping the source first would save nothing
    and changes PIL's pixels for crops under twice the output size: measured with Pillow 13.)
    PIL resizes the width first, into a size x rows buffer: a box narrower than `size` with more
    than EXACT_RESIZE_LIMIT * size rows (only a squashed thin strip: a crop or a square never is)
    is transposed, so that buffer holds fewer than size x size pixels.
    """
    if isinstance(img, np.ndarray):
        img = Image.fromarray(_array_to_rgb(img))
    left, top, right, bottom = _draft(img, box, size)
    w, h = img.size
    box = (left, top, min(right, w), min(bottom, h))  # (left + S) * scale may pass w by a rounding error
    rows, cols = box[3] - box[1], box[2] - box[0]
    im, resample = to_rgb(img), RESAMPLE[interpolation]
    if rows > EXACT_RESIZE_LIMIT * size and cols < size:
        flip = Image.Transpose.TRANSPOSE  # (x, y) -> (y, x): the box's axes swap too
        out = im.transpose(flip).resize((size, size), resample, box=(box[1], box[0], box[3], box[2]))
        return np.asarray(out.transpose(flip))
    return np.asarray(im.resize((size, size), resample, box=box))


# ---------------------------------------------------------------------------
# Pixel values


def normalize(x: np.ndarray, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
    """uint8 (..., 3) -> float32 (x / 255 - mean) / std, computed as x * a - b (one copy, two
    in-place passes; within 3e-7 of the torchvision ToTensor + Normalize result)."""
    scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
    shift = (np.asarray(mean) / np.asarray(std)).astype(np.float32)
    out = x.astype(np.float32)
    out *= scale
    out -= shift
    return out


def _normalize01(x: np.ndarray, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
    """float32 (..., 3) in [0, 1] -> normalised."""
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32, copy=False)


def color_jitter(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation jitter on float (H, W, 3) in [0, 1], in random order.

    Each factor is drawn from U(max(0, 1 - strength), 1 + strength); values are clipped to
    [0, 1] after each step, as torchvision's ColorJitter does.
    """
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    factors = rng.uniform(lo, hi, size=3).astype(np.float32)
    for op in rng.permutation(3):
        f = factors[op]
        if op == 0:  # brightness: blend with black
            x = x * f
        elif op == 1:  # contrast: blend with the mean grey level
            x = f * x + (1 - f) * float((x @ _LUMA).mean())
        else:  # saturation: blend with the per-pixel grey
            x = f * x + (1 - f) * (x @ _LUMA)[..., None]
        x = np.clip(x, 0.0, 1.0)
    return x


# ---------------------------------------------------------------------------
# A model's preprocessing settings, and the two transforms


@dataclass(frozen=True)
class ImagePreprocess:
    """How a model wants its pixels: mean/std, resize mode and filter (ModelConfig's image_mean,
    image_std, resize_mode, interpolation). The defaults are CLIP's."""

    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resize_mode: ResizeMode = "shortest"
    interpolation: Interpolation = "bicubic"

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(self.mean))  # lists too, and equal to the tuple form
        object.__setattr__(self, "std", tuple(self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError(f"mean and std must be 3 numbers, std > 0; got {self.mean}, {self.std}")
        if self.resize_mode not in typing.get_args(ResizeMode):
            raise ValueError(
                f"resize_mode must be one of {typing.get_args(ResizeMode)}, got {self.resize_mode!r}"
            )
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"interpolation must be one of {tuple(RESAMPLE)}, got {self.interpolation!r}")

    @classmethod
    def of(cls, model_config) -> ImagePreprocess:
        """A ModelConfig's preprocessing (the one place that reads those fields)."""
        c = model_config
        return cls(tuple(c.image_mean), tuple(c.image_std), c.resize_mode, c.interpolation)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """uint8 (..., 3) -> float32, normalised with this mean/std."""
        return normalize(x, self.mean, self.std)

    def eval_transform(self, image_size: int) -> EvalTransform:
        return EvalTransform(image_size, self)

    def train_transform(self, image_size: int, **augment) -> TrainTransform:
        """Random resized crop with this filter and mean/std; `augment`: TrainTransform's scale,
        ratio, color_jitter, hflip."""
        return TrainTransform(image_size, **augment, preprocess=self)


CLIP_PREPROCESS = ImagePreprocess()


class EvalTransform:
    """The eval preprocessing: shorter side -> S and centre crop (resize_mode "shortest", CLIP's),
    or the whole image -> S x S ("squash", SigLIP's); then normalise.

    Call as `t(img)` or `t(img, rng)` (rng ignored) so it is interchangeable with
    TrainTransform. Returns float32 (S, S, 3).
    """

    def __init__(self, image_size: int, preprocess: ImagePreprocess = CLIP_PREPROCESS):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size, self.preprocess = image_size, preprocess

    def __call__(self, img: Image.Image | np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        size, p = self.image_size, self.preprocess
        w, h = image_size(img)
        if p.resize_mode == "squash":  # the whole image, both sides to S (bounded: resample_box)
            return p.normalize(resample_box(img, (0, 0, w, h), size, p.interpolation))
        box = center_crop_box(w, h, size)
        new_w, new_h = _shorter_to(w, h, size)
        if new_w * new_h > EXACT_RESIZE_LIMIT * size * size:  # a thin strip: resample the crop only
            return p.normalize(resample_box(img, box, size, p.interpolation))
        _draft(img, box, size)  # a large JPEG decodes smaller, then is resized like any image
        im = resize_shorter(to_rgb(img), size, p.interpolation)
        left, top = _center_offsets(im.width, im.height, size)
        return p.normalize(np.asarray(im)[top : top + size, left : left + size])  # crop = a view

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, preprocess={self.preprocess})"


class TrainTransform:
    """Random resized crop (the model's filter) + optional colour jitter + optional horizontal flip,
    normalised with the model's mean/std (`preprocess`; CLIP's by default).

    Flip is off by default because captions mention left and right. All randomness
    comes from the `rng` argument: the same generator state gives the same output.
    Returns float32 (S, S, 3).
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        color_jitter: float = 0.0,
        hflip: bool = False,
        preprocess: ImagePreprocess = CLIP_PREPROCESS,
    ):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        self.image_size = image_size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.color_jitter = float(color_jitter)
        self.hflip = bool(hflip)
        self.preprocess = preprocess

    def __call__(self, img: Image.Image | np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not isinstance(rng, np.random.Generator):
            raise TypeError("TrainTransform needs an np.random.Generator: t(img, rng)")
        p = self.preprocess
        box = random_resized_crop_box(*image_size(img), self.scale, self.ratio, rng)  # source pixels
        x = resample_box(img, box, self.image_size, p.interpolation)  # uint8 (S, S, 3)
        if self.color_jitter > 0:
            x = color_jitter(x.astype(np.float32) / np.float32(255.0), self.color_jitter, rng)
        if self.hflip and rng.random() < 0.5:
            x = x[:, ::-1]
        return _normalize01(x, p.mean, p.std) if self.color_jitter > 0 else p.normalize(x)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
            f"color_jitter={self.color_jitter}, hflip={self.hflip}, preprocess={self.preprocess})"
        )


def eval_transform(image_size: int) -> EvalTransform:
    return EvalTransform(image_size)


def train_transform(
    image_size: int,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    color_jitter: float = 0.0,
    hflip: bool = False,
) -> TrainTransform:
    return TrainTransform(image_size, scale=scale, ratio=ratio, color_jitter=color_jitter, hflip=hflip)


__all__ = [
    "CLIP_PREPROCESS",
    "OPENAI_MEAN",
    "OPENAI_STD",
    "EvalTransform",
    "ImagePreprocess",
    "TrainTransform",
    "center_crop",
    "center_crop_box",
    "color_jitter",
    "eval_transform",
    "normalize",
    "random_resized_crop_box",
    "resample_box",
    "resize_shorter",
    "to_rgb",
    "train_transform",
]
